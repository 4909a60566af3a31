"""OpenAI-compatible HTTP server for a model directory: the official `openai` client works against it unchanged.

    python serve.py --model runs/sft/latest [--lora ADAPTER] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens / max_completion_tokens, stop, seed, stream
                                (server-sent events, stream_options.include_usage); extensions top_k and
                                repetition_penalty (vLLM's names). presence_penalty / frequency_penalty are accepted
                                and ignored (our sampler has the Hugging Face repetition penalty instead). Ranges are
                                OpenAI's (temperature 0-2, top_p 0-1, penalties -2..2, max_tokens >= 1); 400 outside
                                them. A temperature below 1e-5 is greedy, as 0 is (top_p 0 too); repetition_penalty is
                                0.01-10 (1 = off).
    GET  /v1/models             the one served model
    GET  /health                readiness probe (no key needed)

The model generates one request at a time on a single worker thread (torch code blocks; the event loop never runs
it): requests queue in arrival order, streamed tokens reach the client through an asyncio queue, and beyond
--max-queue waiting requests the server answers 429 so a client backs off instead of piling up. Every error is a 4xx
(or 5xx) with OpenAI's body `{"error": {"message", "type", "param", "code"}}`; a client's mistake never shows the
server's internals (no exception names, no traceback) and logs no traceback, and a bug is a 500 whose body says only
that the server failed (its traceback goes to the log). A body over --max-request-bytes is a 413 before anything
parses it (a declared Content-Length at once, a chunked body as soon as it passes the limit). Text holding a lone
surrogate (`"\\ud800"` in JSON: not Unicode) is a 400. A conversation is encoded exactly as in SFT (no history
trimming): prompt tokens + max_tokens beyond the context window is a 400, as with OpenAI.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import Transformer
from model.chat import DTYPES, load_chat_model
from model.generation import SamplingConfig, TextStream, chat_prompt, default_stop_ids, resolve_template, stream
from utils.errors import user_errors_exit
from utils.templates import TEMPLATES, ChatTemplate
from utils.tokenizer import Tokenizer

log = logging.getLogger("uvicorn.error")  # uvicorn's own error log: its handler and --log-level apply
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
GREEDY_BELOW = 1e-5  # a temperature under this is greedy: dividing logits by 1e-45 overflows to inf (nan samples)


# ---- errors ------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate echoed: escaped
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- the request (OpenAI's schema; unknown fields are ignored, as OpenAI-compatible servers do) --------------------
def valid_unicode(value: Any) -> Any:
    """A field validator: every string in `value` (a str, a list of them, content parts) must be encodable Unicode.
    JSON may escape a lone surrogate ("\\ud800"); Python decodes it into a str the tokenizer cannot take."""
    for text in _strings(value):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"invalid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
                                 f"{e.start} (JSON escapes \\uD800-\\uDFFF come only in pairs)") from None
    return value


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, ContentPart):
        yield from _strings([value.type, value.text])


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    unicode_only = field_validator("content", "name")(valid_unicode)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" or p.text is None for p in self.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # OpenAI's ranges (its API reference; null = the default, as there). nan fails every bound.
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)  # below GREEDY_BELOW: greedy
    top_p: float | None = Field(None, ge=0, le=1)  # 0: greedy
    max_tokens: int | None = Field(None, ge=1)  # and at most what the context window leaves (Engine.prepare)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI; torch.Generator overflows beyond
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    # vLLM's extensions: top_k -1 or 0 = off; repetition_penalty 1 = off, bounded so that logits / penalty stays
    # finite in fp32 (1e-300 divides them into inf: nan samples)
    top_k: int | None = Field(0, ge=-1)
    repetition_penalty: float | None = Field(1.0, ge=0.01, le=10)

    unicode_only = field_validator("model", "stop")(valid_unicode)


# ---- the engine: one model, one worker thread ----------------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[int]
    config: SamplingConfig
    stop_strings: tuple[str, ...]


class Engine:
    """Runs generations one at a time, in arrival order, on a single worker thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: ChatTemplate, name: str,
                 default_max_tokens: int = 512, max_queue: int = 64):
        self.model, self.tokenizer, self.template, self.name = model.eval(), tokenizer, template, name
        self.default_max_tokens, self.max_queue = default_max_tokens, max_queue
        self.context = model.config.max_position_embeddings
        self.stop_ids = default_stop_ids(tokenizer, template)
        self.created = int(time.time())
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._pending = 0

    def messages(self, req: ChatRequest) -> list[dict]:
        """OpenAI messages -> our template's: system/developer messages joined into one leading system prompt; a
        conversation with no user turn (some data factories send a lone system prompt) asks it as the user."""
        system = [m.text() for m in req.messages if m.role in ("system", "developer")]
        turns = [{"role": m.role, "content": m.text()} for m in req.messages if m.role in ("user", "assistant")]
        if not turns:
            return [{"role": "user", "content": "\n".join(system)}]
        return ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns

    def prepare(self, req: ChatRequest) -> Job:
        """Validate and encode a request (raises APIError 4xx)."""
        if req.model != self.name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings",
                           param="stop")
        try:
            prompt = chat_prompt(self.tokenizer, self.messages(req), self.template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        room = self.context - len(prompt)
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room or room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {len(prompt) + (asked or 1)} tokens ({len(prompt)} in the messages, "
                           f"{asked or 1} in the completion). Please reduce the length of the messages or "
                           "completion.", param="messages", code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0 or temperature < GREEDY_BELOW:  # only the most likely token: greedy
            temperature, top_p = 0.0, 1.0
        repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
        try:
            config = SamplingConfig(temperature=temperature, top_p=top_p, top_k=max(req.top_k or 0, 0),
                                    repetition_penalty=repetition_penalty, seed=req.seed,
                                    max_new_tokens=asked or min(self.default_max_tokens, room),
                                    stop_ids=self.stop_ids)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return Job(prompt, config, (*stops, *self.template.stop_strings))

    def submit(self, job: Job, emit: Callable[[str | None], None] | None, cancel: threading.Event) -> Future:
        """Queue a generation; emit(delta) gets each text delta and emit(None) at the end. 429 when the queue is
        full."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise APIError(429, f"the server is busy ({self._pending} requests queued); retry later",
                               type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self._pending += 1
        future = self._worker.submit(self._generate, job, emit, cancel)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _generate(self, job: Job, emit, cancel: threading.Event) -> TextStream | None:
        if cancel.is_set():  # the client left while queued
            return None
        try:  # the end is always signalled, even when the generation fails before its first token
            out = stream(self.model, job.prompt_ids, job.config, self.tokenizer, job.stop_strings)
            try:
                for delta in out:
                    if cancel.is_set():
                        break
                    if emit is not None:
                        emit(delta)
            finally:
                out.close()
        finally:
            if emit is not None:
                emit(None)
        return out

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


# ---- the app -------------------------------------------------------------------------------------------------------
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
SERVER_ERROR = "The server had an error while processing your request; its log has the details."


def _usage(out: TextStream) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
            "total_tokens": out.prompt_tokens + len(out.token_ids)}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before anything parses it. A Content-Length over
    the limit is refused before a byte of the body is read; a body without one (chunked) is counted as it arrives
    and refused, the connection closed, as soon as it passes the limit. No request holds more than max_bytes."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(scope, receive, send, f"The request body ({int(declared):,} bytes) is")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, "The request body is")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: http.disconnect when the client leaves
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send, what: str) -> None:
        # Connection: close: the rest of the body is never read (HTTP clients read this answer when a write fails)
        error = APIError(413, f"{what} larger than this server's limit of {self.max_bytes:,} bytes "
                         "(--max-request-bytes).", code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="Chat-LM-small", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", msg)
            return APIError(400, f"We could not parse the JSON body of your request: {detail}").response()
        elif loc:
            message = f"{'.'.join(loc)}: {msg}"
        else:
            message = f"request body: {msg}"
        return APIError(400, message, param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=None, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        """A bug, or a failure on the worker thread: still OpenAI's body, so clients parse it, but nothing of the
        exception in it (uvicorn logs the traceback)."""
        return APIError(500, SERVER_ERROR, type="server_error").response()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "chat-lm-small"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        if model_id != engine.name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest, request: Request):
        job = await run_in_threadpool(engine.prepare, req)  # tokenizing a long prompt stays off the event loop
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cancel = threading.Event()
        if not req.stream:
            result = asyncio.wrap_future(engine.submit(job, None, cancel))
            try:  # uvicorn does not cancel a handler whose client left: watch for it, or it holds the worker
                while not (await asyncio.wait({result}, timeout=DISCONNECT_POLL_S))[0]:
                    if await request.is_disconnected():
                        cancel.set()
                        return APIError(499, "the client closed the request").response()
            except asyncio.CancelledError:
                cancel.set()
                raise
            out = result.result()
            return {"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                 "logprobs": None, "finish_reason": out.finish_reason or "stop"}],
                    "usage": _usage(out)}

        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        future = engine.submit(job, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d), cancel)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (delta := await deltas.get()) is not None:
                    yield chunk({"content": delta})
                try:
                    out = await asyncio.wrap_future(future)
                except Exception:  # a failure mid-stream: the status line is already sent
                    log.exception("generation failed mid-stream")
                    yield _sse(APIError(500, SERVER_ERROR, type="server_error").body())
                    return
                yield chunk({}, out.finish_reason or "stop")
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": engine.name, "system_fingerprint": None, "choices": [],
                                "usage": _usage(out)})
                yield _sse("[DONE]")
            finally:
                cancel.set()  # the client went away (or we are done): stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---- loading -------------------------------------------------------------------------------------------------------
def load_served_model(model_dir: str | Path, lora: str | Path | None = None, device: str = "auto",
                      dtype: str = "auto", qlora: bool = False) -> tuple[Transformer, Tokenizer]:
    """The model to serve; a LoRA adapter on a full-precision base is merged in, so serving it costs nothing per
    token (on an NF4 base it stays a side path)."""
    model, tokenizer = load_chat_model(model_dir, lora, qlora, device, dtype)
    if lora is not None and not qlora:
        from model.lora import merge_and_unload
        model = merge_and_unload(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--lora", default=None, help="PEFT-format LoRA adapter directory, merged into the model")
    parser.add_argument("--qlora", action="store_true",
                        help="load the base model's block linears in 4-bit NF4 (the adapter stays unmerged)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists; unset = the model directory's name")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 127.0.0.1 keeps the server local (0.0.0.0 exposes it: set --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1 (unset = no auth; the CHAT_LM_API_KEY "
                             "environment variable is read when this is not given)")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                        help="chat template; unset = the tokenizer's own (tokenizer_config.json)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="answer length when a request gives no max_tokens (capped by the context window)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get 429")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="a request body larger than this gets 413 before it is read further or parsed")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights dtype; auto = bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0 = torch's default; 1 is often fastest for a small model)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (info logs every request)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a startup error")


def check_options(args: argparse.Namespace) -> None:
    """Option values that would fail later, deep in torch or uvicorn, as one ValueError naming the option."""
    for name, low in (("port", 0), ("max_tokens", 1), ("max_queue", 1), ("max_request_bytes", 1), ("threads", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.port > 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    if args.device == "auto":
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: MPS is not available (try --device cpu)")


def main(args: argparse.Namespace) -> None:
    """Load the model and serve it. A user's mistake (missing model or adapter directory, bad option value) raises
    OSError or ValueError; the command line turns that into one line and exit 2."""
    import uvicorn
    check_options(args)
    api_key = args.api_key or os.environ.get("CHAT_LM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_served_model(args.model, args.lora, args.device, args.dtype, args.qlora)
    template = resolve_template(args.template, tokenizer)
    name = args.served_model_name or Path(args.model).name
    engine = Engine(model, tokenizer, template, name, args.max_tokens, args.max_queue)
    print(f"serving {name!r} ({model.num_parameters():,} parameters, {template.name} template, context "
          f"{engine.context}) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, api_key, args.max_request_bytes), host=args.host, port=args.port,
                log_level=args.log_level)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the usage examples' line breaks and shows every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli_args = build_parser().parse_args()
    with user_errors_exit(cli_args.debug):
        main(cli_args)
