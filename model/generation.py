"""Text generation: incremental decoding over the preallocated KV cache, Hugging Face-compatible logits processing
(repetition penalty, then temperature, top-k, top-p), stop tokens, batched left-padded generation, a UTF-8-safe text
stream, and the chat prompt builder shared by the console chat and the HTTP server.

The per-step work is pure tensor code (no `.item()`, no Python branching on values, sampling noise drawn ahead), so
the whole step, sampling included, compiles into one CUDA graph; the only host sync is the "has every row stopped?"
check, which `generate` makes every few steps so the host queues work ahead of the GPU.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils.progress import progress_bar
from utils.templates import ChatTemplate, encode_segments, ends_turn_with_token, get_template
from utils.tokenizer import TextDecoder

from .transformer import KVCache, Transformer

# Attention kernels for dynamic-shape decoding: a growing key length means a new shape every step, and the cuDNN SDPA
# backend builds an execution plan per shape, which costs more than the step. The flash / memory-efficient / math
# kernels need no per-shape plan.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class SamplingConfig:
    """How to pick the next token. temperature 0 is greedy (argmax after the repetition penalty).

    top_k 0 and top_p 1.0 switch those filters off; repetition_penalty follows Hugging Face (every token already in
    the prompt or the answer gets its logit divided by the penalty when positive, multiplied when negative).
    stop_ids: generation stops at the first of these (not returned); empty means the default stops (the model's
    eos for `generate`, the tokenizer's for `stream`). seed: a fixed seed reproduces the same sample.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---- logits processing (Hugging Face semantics, checked against transformers' processors in the tests) ----------
def token_presence(ids: torch.Tensor, vocab_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, vocab] bool: which tokens occur in each row of ids [B, T] (positions where valid is False are ignored)."""
    if valid is not None:
        ids = ids.masked_fill(~valid.bool(), vocab_size)  # an extra column that is dropped below
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits after the repetition penalty, temperature, top-k and top-p (transformers' order)."""
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k > 0:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return logits


def next_token(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None,
               race: torch.Tensor | None) -> torch.Tensor:
    """[B] next ids. Sampling is the exponential race: argmax of p / E with E ~ Exp(1) ([B, vocab], from
    `RaceNoise`) samples the categorical p exactly, with no host sync and no RNG inside the step."""
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return logits.argmax(-1)
    return (logits.softmax(-1) / race).argmax(-1)


class RaceNoise:
    """Exp(1) draws for `next_token`, made several decoding steps at a time (up to `max_bytes`) outside the step.

    A compiled step then holds no RNG state (a CUDA graph replays fixed kernels), and every decoding path (eager,
    static, compiled) consumes the same draws, so a seed gives the same tokens on all of them."""

    def __init__(self, batch: int, vocab: int, device: torch.device, generator: torch.Generator | None,
                 max_bytes: int = 2**26):
        self.buffer = torch.empty(max(1, min(32, max_bytes // (4 * batch * vocab))), batch, vocab, device=device)
        self.generator, self.used = generator, len(self.buffer)

    def next(self) -> torch.Tensor:
        if self.used == len(self.buffer):  # the clamp: a 0 draw would make 0 / 0 = nan win the argmax
            self.buffer.exponential_(1.0, generator=self.generator).clamp_(min=torch.finfo(torch.float32).tiny)
            self.used = 0
        self.used += 1
        return self.buffer[self.used - 1]


# ---- decoding ----------------------------------------------------------------------------------------------------
def _model_device(model: Transformer) -> torch.device:
    return model.model.embed_tokens.weight.device


def default_model_stop_ids(model: Transformer) -> tuple[int, ...]:
    eos = model.config.eos_token_id
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def _static_step(model: Transformer, token: torch.Tensor, cache: KVCache, position: torch.Tensor,
                 mask: torch.Tensor | None, config: SamplingConfig, seen: torch.Tensor | None,
                 race: torch.Tensor | None) -> torch.Tensor:
    """The next token [B] after `token` at `position`, with shapes fixed by the cache: what torch.compile captures
    as one CUDA graph, sampling included (and the prefill runs eagerly for the whole prompt)."""
    logits = model(token, cache=cache, cache_position=position, attention_mask=mask, logits_to_keep=1)[:, -1]
    return next_token(logits, config, seen, race)


@functools.cache
def compiled_step(device_type: str):
    """`_static_step` compiled once per device type. On a GPU mode "max-autotune": CUDA graphs, and matmul kernels
    tuned for the one-token shapes (Triton GEMVs beat cuBLAS there), at about 20 s of first-call tuning. Elsewhere
    inductor's defaults."""
    return torch.compile(_static_step, mode="max-autotune" if device_type == "cuda" else None, fullgraph=True)


def static_cache(model: Transformer, batch_size: int) -> KVCache:
    """A full-context cache kept on the model and reused by later calls (stale slots are masked), so a compiled
    step sees the same buffers every time."""
    cache = getattr(model, "_static_cache", None)
    p = model.model.embed_tokens.weight
    if cache is None or cache.batch_size != batch_size or cache.k[0].dtype != p.dtype or cache.k[0].device != p.device:
        model._static_cache = cache = model.setup_cache(batch_size, model.config.max_position_embeddings)
    return cache


@torch.inference_mode()
def decode_steps(model: Transformer, prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 pad_id: int = 0, static: bool = False, compile: bool = False,
                 check_every: int = 1) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B] on the model's device, one step at a time.

    Prompts are left-padded to a common length. Stops when every row has produced a stop id (rows that stopped
    keep producing tokens, which callers drop), after max_new_tokens, or when the context window is full.
    static: decode over a full-context cache with fixed shapes (no per-step reallocation or growing masks);
    compile: also torch.compile the step (CUDA graphs and tuned kernels on a GPU, see compiled_step). Same tokens
    either way.
    check_every: look for "every row stopped" (a host sync) only every this many steps, so the host can queue
    steps ahead of the GPU; rows that stopped keep going for up to check_every - 1 steps, which callers drop.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab, max_pos = model.config.vocab_size, model.config.max_position_embeddings
    for row, p in enumerate(prompts):
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {row} has token id {bad}, outside the model's vocabulary of {vocab}")
    B, L = len(prompts), max(map(len, prompts))
    if L >= max_pos:
        raise ValueError(f"prompt of {L} tokens leaves no room in the context window of {max_pos} tokens")
    max_new = min(config.max_new_tokens, max_pos - L)
    device = _model_device(model)

    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.ones(B, L + max_new, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, :L - len(p)] = 0
    ids, mask = ids.to(device), mask.to(device)
    padded = any(len(p) != L for p in prompts)  # without padding the cache needs no mask at all

    stop = torch.tensor(config.stop_ids or default_model_stop_ids(model), dtype=torch.long, device=device)
    seen = token_presence(ids, vocab, mask[:, :L]) if config.repetition_penalty != 1.0 else None
    noise = None
    if not config.greedy:
        generator = None if config.seed is None else torch.Generator(device=device).manual_seed(config.seed)
        noise = RaceNoise(B, vocab, device, generator)

    # fixed shapes (static / compiled) build one cuDNN plan and keep it: the fastest kernel there
    backends = [SDPBackend.CUDNN_ATTENTION, *DECODE_SDPA_BACKENDS] if static or compile else DECODE_SDPA_BACKENDS
    with sdpa_kernel(backends):
        yield from _decode(model, ids, mask, L, max_new, padded, config, stop, seen, noise, static, compile,
                           check_every)


def _decode(model, ids, mask, L, max_new, padded, config, stop, seen, noise, static, compile, check_every):
    """The decode loop of `decode_steps` over prepared, left-padded tensors (prompt length L)."""
    B, device = ids.shape[0], ids.device
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    race = lambda: None if noise is None else noise.next()  # noqa: E731
    if static or compile:
        cache = static_cache(model, B)
        full_mask = None
        if padded:
            full_mask = torch.ones(B, cache.max_len, dtype=torch.long, device=device)
            full_mask[:, :L] = mask[:, :L]
        step_fn = compiled_step(device.type) if compile else _static_step
        token = _static_step(model, ids, cache, torch.arange(L, device=device), full_mask, config, seen, race())
        positions = torch.arange(L, L + max_new, device=device)
        # clone: a CUDA graph's output is overwritten by its next replay
        advance = lambda token, step: step_fn(model, token[:, None], cache, positions[step:step + 1],  # noqa: E731
                                              full_mask, config, seen, race()).clone()
    else:
        cache = model.setup_cache(B, L + max_new)
        logits = model(ids, attention_mask=mask[:, :L] if padded else None, cache=cache, logits_to_keep=1)[:, -1]
        token = next_token(logits, config, seen, race())
        advance = lambda token, step: next_token(model(  # noqa: E731
            token[:, None], attention_mask=mask[:, :L + step + 1] if padded else None, cache=cache)[:, -1],
            config, seen, race())
    for step in range(max_new):
        yield token
        finished |= torch.isin(token, stop)
        if step + 1 == max_new or ((step + 1) % check_every == 0 and bool(finished.all())):  # the host sync
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        token = advance(token, step)


def generate(model: Transformer, prompts: Sequence[Sequence[int]], config: SamplingConfig,
             pad_id: int | None = None, static: bool = False, compile: bool = False) -> list[list[int]]:
    """New tokens for each prompt (batched, left-padded), each cut before its first stop id."""
    pad = pad_id if pad_id is not None else model.config.pad_token_id or 0
    steps = list(decode_steps(model, prompts, config, pad, static, compile, check_every=8))
    rows = torch.stack(steps, 1).tolist()
    stops = set(config.stop_ids or default_model_stop_ids(model))
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out


# ---- text streaming ----------------------------------------------------------------------------------------------
def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Text up to the earliest stop string (for templates whose end of turn is several tokens, e.g. "\\n问：")."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    return max((n for s in stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)


class TextStream:
    """Iterator of text deltas of one answer. Only complete characters are emitted (a token that ends inside a
    multi-byte UTF-8 character waits for the next one; bytes that never form a character are dropped, never shown as
    U+FFFD: utils.tokenizer.TextDecoder), and text that might be the start of a stop string is held back until it
    is not. After iteration: `token_ids`, `text`, `finish_reason` ("stop", "length" or None while running or when
    interrupted), and timings for tokens/s."""

    def __init__(self, model: Transformer, prompt_ids: Sequence[int], config: SamplingConfig, tokenizer,
                 stop_strings: Sequence[str] = (), compile: bool = False):
        self.config = config if config.stop_ids else replace(config, stop_ids=default_stop_ids(tokenizer))
        self.tokenizer, self.stop_strings = tokenizer, tuple(s for s in stop_strings if s)
        self.prompt_tokens = len(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.start = time.perf_counter()
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self._steps = decode_steps(model, [list(prompt_ids)], self.config, tokenizer.pad_id, static=compile,
                                   compile=compile)
        self._deltas = self._run()

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()
        self._steps.close()

    def first_token_seconds(self) -> float | None:
        """Latency to the first token: the prompt's forward pass (prefill) plus one sampling step."""
        return None if self.first_token_time is None else self.first_token_time - self.start

    def tokens_per_second(self) -> float | None:
        """Decoding speed after the first token (prefill excluded)."""
        if self.first_token_time is None or self.end_time is None or len(self.token_ids) < 2:
            return None
        return (len(self.token_ids) - 1) / max(self.end_time - self.first_token_time, 1e-9)

    def _run(self) -> Iterator[str]:
        stops = set(self.config.stop_ids)
        decoder = TextDecoder(self.tokenizer, skip_special_tokens=True)  # complete characters only, one token at a time
        text = ""
        for step in self._steps:
            token = int(step[0])
            now = time.perf_counter()
            self.first_token_time = self.first_token_time or now
            self.end_time = now
            if token in stops:
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            text += decoder.push([token])
            cut = truncate_at_stop_strings(text, self.stop_strings)
            if len(cut) < len(text):  # a stop string completed
                self.finish_reason = "stop"
                yield from self._emit(cut)
                return
            yield from self._emit(text[:len(text) - _held_back(text, self.stop_strings)])
        else:
            self.finish_reason = "length"
        yield from self._emit(text + decoder.push((), final=True))  # bytes of a character never completed: dropped

    def _emit(self, text: str) -> Iterator[str]:
        if len(text) > len(self.text):
            delta, self.text = text[len(self.text):], text
            yield delta


def stream(model: Transformer, prompt_ids: Sequence[int], config: SamplingConfig, tokenizer,
           stop_strings: Sequence[str] = (), compile: bool = False) -> TextStream:
    """Text deltas of one answer as they are generated; joined, they equal the decoded answer (cut at the first
    stop string). Empty `config.stop_ids` means `default_stop_ids(tokenizer)`. compile: the compiled fixed-shape
    decode step (decode_steps)."""
    return TextStream(model, prompt_ids, config, tokenizer, stop_strings, compile)


# ---- chat ----------------------------------------------------------------------------------------------------------
def resolve_template(template: str | ChatTemplate | None, tokenizer) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    return get_template(template or tokenizer.default_template)


def default_stop_ids(tokenizer, template: str | ChatTemplate | None = None) -> tuple[int, ...]:
    """eos, `<|im_end|>` when the vocabulary has it, and every template stop string that is a single token."""
    ids = [tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")]
    for s in resolve_template(template, tokenizer).stop_strings:
        encoded = tokenizer.encode(s)
        if len(encoded) == 1:
            ids.append(encoded[0])
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def encode_chat(tokenizer, template: ChatTemplate, messages: list[dict]) -> list[int]:
    """Token ids of a conversation plus the generation prompt, through the same `encode_segments` as SFT data
    (`utils.templates.tokenize_sft`), so the model continues from the token boundary it was trained on. Only the
    template's markers become special tokens: `<|im_end|>` or `</s>` typed in a message is plain text, so a user
    cannot close a turn or forge the assistant's part (cli_demo.py and serve.py build their prompts here)."""
    pieces = template.pieces(messages, add_generation_prompt=True)
    return encode_segments(tokenizer, [pieces], not ends_turn_with_token(template, tokenizer))[0][0]


def chat_prompt(tokenizer, messages: list[dict], template: str | ChatTemplate | None = None,
                max_tokens: int | None = None) -> list[int]:
    """Prompt ids for the next answer to `messages` (an optional system message, then user/assistant turns ending
    with the user's question). When they exceed max_tokens (the context window minus max_new_tokens), the oldest
    user/assistant pairs are dropped; the system prompt and the current question always stay. Raises ValueError
    when the system prompt plus the question alone do not fit."""
    tpl = resolve_template(template, tokenizer)
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    turns = list(messages[len(system):])
    if not turns or turns[-1].get("role") != "user":
        raise ValueError("the conversation must end with a user message")
    for start in range(0, len(turns), 2):
        ids = encode_chat(tokenizer, tpl, system + turns[start:])
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
    raise ValueError(f"the question takes {len(ids)} tokens with the template, more than the {max_tokens} the "
                     "context window leaves for a prompt: shorten it or lower max_new_tokens")


def context_budget(model: Transformer, config: SamplingConfig) -> int:
    """Prompt tokens that still leave room for max_new_tokens in the model's context window."""
    budget = model.config.max_position_embeddings - config.max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens {config.max_new_tokens} does not fit the context window of "
                         f"{model.config.max_position_embeddings} tokens")
    return budget


def generate_answers(model: Transformer, tokenizer, conversations: Sequence[list[dict]],
                     template: str | ChatTemplate | None, config: SamplingConfig, batch_size: int = 16,
                     progress: bool = False) -> tuple[list[str | None], int]:
    """(answer text per conversation, None where it does not fit the context window; tokens generated).

    Each conversation (optional system message, then turns ending with a user message) is rendered with the template;
    prompts are sorted by length and generated in left-padded batches, so little padding is computed; each answer is
    decoded without special tokens (and without bytes that form no character: no U+FFFD) and cut at the template's stop
    strings (multi-token turn ends such as "\n问：").
    """
    tpl = resolve_template(template, tokenizer)
    if not config.stop_ids:
        config = replace(config, stop_ids=default_stop_ids(tokenizer, tpl))
    budget = context_budget(model, config)
    ids: list[list[int] | None] = []
    for messages in conversations:
        try:
            ids.append(chat_prompt(tokenizer, messages, tpl, budget))
        except ValueError:
            ids.append(None)
    order = sorted((i for i, x in enumerate(ids) if x is not None), key=lambda i: len(ids[i]))
    answers: list[str | None] = [None] * len(conversations)
    n_tokens = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("generating", total=len(order))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, out in zip(batch, generate(model, [ids[i] for i in batch], config, pad_id=tokenizer.pad_id)):
                n_tokens += len(out)
                answer = tokenizer.decode(out, skip_special_tokens=True, errors="ignore")
                answers[i] = truncate_at_stop_strings(answer, tpl.stop_strings)
            bar.advance(task, len(batch))
    return answers, n_tokens
