"""serve.py through the real HTTP stack: a subprocess on a free loopback port, driven by the official `openai` client
(and raw httpx for the malformed requests the client cannot send).

The model is a tiny random decoder whose stop tokens are pushed far down in its logits, so every answer runs to
max_tokens: a known length. Greedy answers are compared with in-process generation (model.generation), the
independent reference; streamed answers with the non-streamed ones.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from model import ModelConfig, Transformer, save_model
from model.generation import SamplingConfig, chat_prompt, default_stop_ids, generate, resolve_template
from utils.tokenizer import Tokenizer, train_tokenizer

openai = pytest.importorskip("openai", reason="the official client is the reference (requirements-dev)")

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789"
TEXT = "\n".join(["你好，我是一个很小的聊天模型。今天天气怎么样？我们一起去公园散步吧。",
                  "The quick brown fox jumps over the lazy dog, twice.",
                  "机器学习是人工智能的一个分支，它让计算机从数据中学习规律。"] * 20)


# ---- helpers shared with test_synth ------------------------------------------------------------------------------
def build_tokenizer(path: Path, text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the ChatML template, trained on `text`."""
    (path / "text").mkdir(parents=True, exist_ok=True)
    (path / "text" / "text.txt").write_text(text, encoding="utf-8")
    train_tokenizer([path / "text" / "text.txt"], vocab_size, path / "tok", template="chatml")
    return Tokenizer.load(path / "tok")


def tiny_config(tok: Tokenizer, context: int, hidden: int = 64, layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                       max_position_embeddings=context, tie_word_embeddings=False,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python serve.py ...` on a free loopback port; ready once /health answers."""

    def __init__(self, model_dir: Path, *flags: str, name: str = "tiny"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(model_dir.parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--model", str(model_dir), "--port", str(self.port),
             "--device", "cpu", "--threads", "1", "--served-model-name", name, *flags],
            cwd=str(REPO), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("serve.py did not become ready in 90 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


# ---- fixtures ------------------------------------------------------------------------------------------------------
CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny random decoder that never emits a stop token: every answer is exactly max_tokens long."""
    path = tmp_path_factory.mktemp("serve")
    tok = build_tokenizer(path, TEXT, 400)
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok, CONTEXT))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[list(default_stop_ids(tok)), 0] = -1.0
    return save_model(model, path / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--api-key", KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model_dir: Path, messages: list[dict], max_tokens: int, lora: Path | None = None) -> str:
    """Greedy answer computed in this process, the way the server must compute it."""
    from serve import load_served_model
    model, tok = load_served_model(model_dir, lora, device="cpu")
    ids = chat_prompt(tok, messages, resolve_template(None, tok))
    out = generate(model, [ids], SamplingConfig(temperature=0.0, max_new_tokens=max_tokens,
                                                stop_ids=default_stop_ids(tok)))
    return tok.decode(out[0], skip_special_tokens=True)


HELLO = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好，今天天气怎么样？"}]


# ---- completions ---------------------------------------------------------------------------------------------------
def test_models_and_non_streaming_completion_match_in_process_generation(client, model_dir):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == reference(model_dir, HELLO, 12)
    prompt_len = len(chat_prompt(Tokenizer.load(model_dir), HELLO, "chatml"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 12, prompt_len + 12)


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(model="tiny", messages=HELLO, max_completion_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_sampling_is_seeded_and_stop_strings_cut_the_answer(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == client.chat.completions.create(**kwargs).choices[0].message.content
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[5:7]
    cut = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_lone_system_prompt_is_asked_as_the_user_turn(client, model_dir):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "生成一轮聊天对话"}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.content == reference(model_dir, [{"role": "user", "content": "生成一轮聊天对话"}], 6)


# ---- auth and bad requests -----------------------------------------------------------------------------------------
def test_auth(server):
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # readiness needs no key


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": HELLO}, 400, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"model": "tiny", "messages": HELLO, "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": HELLO, "n": 2}, 400, "n"),
    ({"model": "tiny", "messages": HELLO, "seed": 2**64}, 400, "seed"),
    ({"model": "tiny", "messages": HELLO, "seed": -2**63 - 1}, 400, "seed"),
    ({"model": "tiny", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": CONTEXT}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "你好" * CONTEXT}]}, 400, "messages"),
    ({"model": "gpt-4", "messages": HELLO}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_an_unexpected_failure_is_an_openai_server_error(model_dir):
    """Anything the code did not foresee (here: the worker thread raising) is still a 500 with OpenAI's body."""
    from fastapi.testclient import TestClient

    from serve import Engine, create_app, load_served_model
    model, tok = load_served_model(model_dir, device="cpu")
    engine = Engine(model, tok, resolve_template(None, tok), "tiny")

    def broken(*args):
        raise RuntimeError("the worker broke")
    engine._generate = broken
    with TestClient(create_app(engine), raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and "the worker broke" in error["message"]


def test_context_window_error_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=CONTEXT - 5)
    assert e.value.code == "context_length_exceeded" and f"maximum context length is {CONTEXT}" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)


# ---- load ----------------------------------------------------------------------------------------------------------
def test_a_burst_of_concurrent_requests_all_complete(server):
    """24 requests at once, half streamed, each with its own prompt and seed: every one gets its own answer."""
    questions = [f"第{i}个问题：今天天气怎么样？" for i in range(24)]

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def ask(i: int, q: str) -> str:
            kwargs = dict(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=10, seed=i)
            if i % 2:
                r = await aclient.chat.completions.create(**kwargs)
                return r.choices[0].message.content
            s = await aclient.chat.completions.create(**kwargs, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in s])
        try:
            return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
        finally:
            await aclient.close()

    answers = asyncio.run(burst())
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    for i, (q, a) in enumerate(zip(questions[:4], answers[:4])):  # each answer is its own request's (no crossing)
        r = sync.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=10,
                                         seed=i)
        assert a == r.choices[0].message.content
    assert all(answers) and len(set(answers)) > 1
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_leaving_mid_stream_does_not_block_the_server(client):
    s = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=CONTEXT - 60, temperature=0,
                                       stream=True)
    next(iter(s)), next(iter(s))
    s.close()
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_clients_that_time_out_do_not_hold_the_worker(server):
    """Non-streaming requests whose clients give up are cancelled: a normal request after them is answered at once
    instead of queueing behind every abandoned full-length generation (48 of them: several seconds of work, more than
    the patient client's timeout; cancelled, they cost a fraction of a second)."""
    async def abandon() -> list:
        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(0.2, connect=30),
                                     headers={"Authorization": f"Bearer {KEY}"}) as h:
            body = {"model": "tiny", "messages": HELLO, "max_tokens": CONTEXT - 60, "temperature": 0}
            return await asyncio.gather(*(h.post("/v1/chat/completions", json=body) for _ in range(48)),
                                        return_exceptions=True)
    assert sum(isinstance(e, httpx.ReadTimeout) for e in asyncio.run(abandon())) >= 40
    patient = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=3)
    r = patient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


# ---- a LoRA adapter, and a full queue --------------------------------------------------------------------------
def test_lora_adapter_is_served_merged_and_a_full_queue_answers_429(model_dir, tmp_path):
    from model import load_model
    from model.lora import apply_lora, save_adapter
    model = load_model(model_dir)
    apply_lora(model, r=4, alpha=8,
               targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 3.0)
    adapter = save_adapter(model, tmp_path / "adapter")

    server = Server(model_dir, "--lora", str(adapter), "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == reference(model_dir, HELLO, 12, lora=adapter)
        assert r.choices[0].message.content != reference(model_dir, HELLO, 12)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
                body = {"model": "tiny", "messages": HELLO, "max_tokens": 100, "temperature": 0}
                return await asyncio.gather(*(h.post("/v1/chat/completions", json=body) for _ in range(6)))
        codes = [r.status_code for r in asyncio.run(burst())]
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}
        limited = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded" and limited.headers["retry-after"] == "1"
        # the official client backs off and retries a 429 by itself
        c_retry = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=5)
        # (seeded: this adapter's greedy answer is a stop token, so an unseeded sample was sometimes empty)
        assert c_retry.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2,
                                               seed=0).choices[0].message.content
    finally:
        server.close()
