"""Chat templates: one description renders the training text, the loss mask and the Hugging Face jinja string.

Every template is the same five pieces of text around the messages, so `render`, `segments` and `jinja` cannot drift
apart (the tests check the jinja against `transformers.apply_chat_template`). Multi-turn rendering, exactly
(`[...]` is present only when there is a system prompt; `|` separates pieces, not text):

    chatml           [<|im_start|>system\\n{sys}<|im_end|>\\n] <|im_start|>user\\n{q}<|im_end|>\\n
                     | <|im_start|>assistant\\n | {a}<|im_end|> | \\n   ... repeated per turn
                     (Qwen1.5 / LLaMA-Factory `qwen` layout)
    qwen             chatml with Qwen1.5-Chat's default system "You are a helpful assistant" when none is given
    wenda            [{sys}\\n] 问：{q} | 答： | {a} || \\n 问：{q2} | 答： | {a2}          (ChatBaichuan-HC3)
    human_assistant  [{sys}\\n\\n] Human: \\n{q}\\n\\n | Assistant: \\n | {a} || \\n\\n Human: ...  (baichuan-QLoRA)
    llama2           <s>[INST] [<<SYS>>\\n{sys}\\n<</SYS>>\\n\\n]{q} [/INST] | ␣{a}␣</s> || <s>[INST] {q2} [/INST] ...
    raw              [{sys}\\n] {q}\\n | {a} || \\n {q2}\\n | {a2}          (same as a pretraining document)

Trainable pieces are the answers plus their end-of-turn marker (`<|im_end|>`, `</s>` for llama2). wenda,
human_assistant and raw have no marker in the text: **the data pipeline appends the tokenizer's eos id after every
trainable segment**, and generation stops at eos (or at `stop_strings`). Content is used verbatim (never stripped).
Messages are an optional system message followed by alternating user/assistant messages starting with user.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from utils.progress import progress_bar

ENCODE_BATCH = 4096  # conversations per encode_batch call (tokenizers threads inside each call)

ROLES = ("system", "user", "assistant")
Parts = tuple[tuple[str, bool], ...]  # a piece as (text, is_template) parts: markers are read only in template text


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str                      # "{content}" wrapped in the user turn's text
    assistant_prefix: str          # the generation prompt: between a user turn and its answer
    assistant: str = "{content}"   # the trainable answer text, with the end-of-turn marker when the template has one
    assistant_suffix: str = ""     # untrained text right after every answer
    turn_sep: str = ""             # untrained text between an answer and the next user turn
    system: str = "{content}\n"    # system prompt wrapper (prepended to the first user content when system_in_user)
    system_in_user: bool = False   # llama2 fuses the system prompt into the first user turn
    default_system: str | None = None
    stop_strings: tuple[str, ...] = ()

    # ---------------------------------------------------------------- rendering
    def pieces(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[Parts, bool]]:
        """The rendered text as consecutive (parts, trainable) pieces, each piece's parts (text, is_template): the
        template's own text (its markers) apart from the messages' content, which is never read for markers when
        encoded. Empty pieces and parts are dropped."""
        system, turns = _split_system(messages, self.default_system)
        out: list[tuple[Parts, bool]] = []
        if system is not None and not self.system_in_user:
            out.append((_fill(self.system, ((system, False),)), False))
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content: Parts = ((m["content"], False),)
                if i == 0 and system is not None and self.system_in_user:
                    content = _fill(self.system, ((system, False),)) + content
                if i > 0:
                    out.append((((self.turn_sep, True),), False))
                out.append((_fill(self.user, content), False))
                if i + 1 < len(turns) or add_generation_prompt:
                    out.append((((self.assistant_prefix, True),), False))
            else:
                out.append((_fill(self.assistant, ((m["content"], False),)), True))
                out.append((((self.assistant_suffix, True),), False))
        kept = [(tuple(p for p in parts if p[0]), t) for parts, t in out]
        return [(parts, t) for parts, t in kept if parts]

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Rendered text as consecutive (piece, trainable) pairs; empty pieces are dropped."""
        return [("".join(text for text, _ in parts), t) for parts, t in self.pieces(messages, add_generation_prompt)]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The whole conversation as text; with add_generation_prompt the text the model continues after a user turn."""
        return "".join(p for p, _ in self.segments(messages, add_generation_prompt))

    # ---------------------------------------------------------------- Hugging Face
    def jinja(self) -> str:
        """The `chat_template` string for tokenizer_config.json that renders exactly `render(...)`."""
        q = _jinja_literal

        def filled(fmt: str, expr: str) -> str:
            head, tail = fmt.split("{content}")
            return f"{q(head)} + {expr} + {q(tail)}"

        sys_default = "none" if self.default_system is None else q(self.default_system)
        parts = [
            "{%- if messages and messages[0]['role'] == 'system' %}"
            "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
            f"{{%- else %}}{{%- set system = {sys_default} %}}{{%- set turns = messages %}}{{%- endif %}}",
        ]
        if not self.system_in_user:
            parts.append(f"{{%- if system is not none %}}{{{{ {filled(self.system, 'system')} }}}}{{%- endif %}}")
        parts.append("{%- for m in turns %}{%- if m['role'] == 'user' %}{%- set content = m['content'] %}")
        if self.system_in_user:
            parts.append(f"{{%- if loop.first and system is not none %}}"
                         f"{{%- set content = {filled(self.system, 'system')} + content %}}{{%- endif %}}")
        parts.append(f"{{%- if not loop.first %}}{{{{ {q(self.turn_sep)} }}}}{{%- endif %}}"
                     f"{{{{ {filled(self.user, 'content')} }}}}"
                     f"{{%- if not loop.last or add_generation_prompt %}}"
                     f"{{{{ {q(self.assistant_prefix)} }}}}{{%- endif %}}"
                     f"{{%- elif m['role'] == 'assistant' %}}"
                     f"{{{{ {filled(self.assistant, 'm[' + q('content') + ']')} + {q(self.assistant_suffix)} }}}}"
                     "{%- endif %}{%- endfor %}")
        return "".join(parts)


def _fill(fmt: str, content: Parts) -> Parts:
    head, tail = fmt.split("{content}")  # not str.format: content may hold braces
    return ((head, True), *content, (tail, True))


def _jinja_literal(s: str) -> str:
    # jinja unescapes string literals like Python; a JSON string is a valid one
    return json.dumps(s, ensure_ascii=False)


def _split_system(messages: list[dict], default_system: str | None) -> tuple[str | None, list[dict]]:
    """Validate the message list; return (system prompt or default, the user/assistant turns)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with role in {ROLES} and a str content, got {m!r}")
    system, turns = default_system, list(messages)
    if turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i + (len(messages) - len(turns))} has role {m['role']!r}, expected {want!r}: "
                             "an optional system message, then user/assistant alternating, starting with user")
    return system, turns


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
               assistant="{content}<|im_end|>", assistant_suffix="\n",
               system="<|im_start|>system\n{content}<|im_end|>\n", stop_strings=("<|im_end|>",))

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in [
    # our small models: ChatML with no default system prompt (a short model gains nothing from a constant preamble)
    ChatTemplate(name="chatml", **_CHATML),
    # Qwen1.5-Chat's own template (tokenizer_config.json, quoted in hiyouga/LLaMA-Factory#3594)
    ChatTemplate(name="qwen", default_system="You are a helpful assistant", **_CHATML),
    ChatTemplate(name="wenda", user="问：{content}", assistant_prefix="答：", turn_sep="\n", stop_strings=("\n问：",)),
    ChatTemplate(name="human_assistant", user="Human: \n{content}\n\n", assistant_prefix="Assistant: \n",
                 system="{content}\n\n", turn_sep="\n\n", stop_strings=("\n\nHuman:",)),
    ChatTemplate(name="llama2", user="<s>[INST] {content} [/INST]", assistant_prefix="", assistant=" {content} </s>",
                 system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True, stop_strings=("</s>",)),
    ChatTemplate(name="raw", user="{content}\n", assistant_prefix="", turn_sep="\n"),
]}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


# ---- chat encoding: conversations -> token ids with trainable flags ------------------------------------------------
Record = dict[str, Any] | Sequence[str]


def to_messages(record: Record, where: str = "record") -> list[dict[str, str]]:
    """A record as chat messages. Accepted: {"messages": [{"role", "content"}, ...]};
    {"prompt", "response", "history"?: [(q, a), ...], "system"?: str}; or a (prompt, response) pair."""
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: bad message {m!r} (need role system|user|assistant and str content)")
        return list(msgs)
    if isinstance(record, dict):
        missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{where}: missing or non-string key(s) {missing}")
        prompt, response = record["prompt"], record["response"]
        history, system = record.get("history") or [], record.get("system")
    elif isinstance(record, (tuple, list)) and len(record) == 2:
        (prompt, response), history, system = record, [], None
    else:
        raise ValueError(f"{where}: expected a dict or a (prompt, response) pair, got {type(record).__name__}")
    msgs = [{"role": "system", "content": system}] if system else []
    for turn in history:
        if len(turn) != 2:
            raise ValueError(f"{where}: history turns must be (question, answer) pairs, got {turn!r}")
        msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def ends_turn_with_token(template: Any, tokenizer: Any) -> bool:
    """Whether the template closes an answer with a special token (ChatML's <|im_end|>, Llama's </s> with a Llama
    tokenizer). If not (wenda, human_assistant, raw, llama2 with our tokenizer), eos is appended after each answer."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x00"}]
    answer = next(text for text, trainable in template.segments(probe) if trainable)
    marker = answer.split("\x00", 1)[1].strip()
    tid = tokenizer.token_to_id(marker) if marker else None
    return tid is not None and tokenizer.encode(marker) == [tid]


@dataclass
class SFTExamples:
    """Tokenized conversations: example e is tokens[offsets[e]:offsets[e+1]] with a per-token `trainable` flag."""

    tokens: np.ndarray  # int32
    trainable: np.ndarray  # bool
    offsets: np.ndarray  # int64 [n + 1]
    stats: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        s, t = self.offsets[e], self.offsets[e + 1]
        return self.tokens[s:t], self.trainable[s:t]


def tokenize_sft(conversations: Sequence[list[dict[str, str]]], tokenizer: Any, template: Any, max_seq_len: int,
                 skip_overlength: bool = False, train_on_prompt: bool = False) -> SFTExamples:
    """Render each conversation segment by segment and tokenize it, marking the trainable tokens.

    An example of n tokens trains n - 1 positions; one longer than max_seq_len positions is skipped
    (`skip_overlength`) or cut to max_seq_len + 1 tokens. Examples left with nothing to learn are skipped.
    """
    append_eos = not ends_turn_with_token(template, tokenizer)
    stats = {"conversations": len(conversations), "examples": 0, "truncated": 0, "skipped_overlength": 0,
             "skipped_no_target": 0}
    # chunk by chunk, each chunk's examples packed into numpy arrays at once: Python int lists (~36 bytes a token)
    # only ever hold one chunk, the result 5 bytes a token
    tokens, flags, lengths = [], [], []
    with progress_bar() as progress:
        task = progress.add_task("tokenizing SFT examples", total=len(conversations))
        for start in range(0, len(conversations), ENCODE_BATCH):
            chunk = conversations[start:start + ENCODE_BATCH]
            toks: list[list[int]] = []
            masks: list[list[bool]] = []
            for x, m in encode_segments(tokenizer, [template.pieces(msgs) for msgs in chunk], append_eos):
                m = [True] * len(m) if train_on_prompt else m
                outcome = _fit_example(x, m, max_seq_len, skip_overlength)
                if outcome is not None:
                    stats[outcome] += 1
                if outcome in (None, "truncated"):
                    toks.append(x[:max_seq_len + 1])
                    masks.append(m[:max_seq_len + 1])
            lens = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
            tokens.append(np.fromiter(chain.from_iterable(toks), dtype=np.int32, count=int(lens.sum())))
            flags.append(np.fromiter(chain.from_iterable(masks), dtype=bool, count=int(lens.sum())))
            lengths.append(lens)
            progress.advance(task, len(chunk))
    lens = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    if not len(lens):
        raise ValueError(f"no usable SFT examples out of {len(conversations)} conversations ({stats})")
    stats["examples"] = len(lens)
    return SFTExamples(np.concatenate(tokens), np.concatenate(flags),
                       np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), stats)


def encode_segments(tokenizer: Any, piece_lists: Sequence[list[tuple[Parts, bool]]],
                    append_eos: bool) -> list[tuple[list[int], list[bool]]]:
    """(ids, trainable flags) of each conversation's template pieces (`ChatTemplate.pieces`), encoded in one batch.

    Only the template's own text becomes special tokens (`<|im_start|>`, `<|im_end|>`, `</s>`): the messages'
    content is encoded as plain text (`Tokenizer.encode_template_batch`), so marker text in a question or in an SFT
    answer cannot end a turn or move the loss mask. Each piece is encoded on its own, so no token straddles a prompt
    and its answer; only a conversation's first piece gets a SentencePiece dummy prefix, as in a whole-text encode;
    eos follows every trainable piece when `append_eos` (templates without an end-of-turn token)."""
    flat = [(parts, j > 0) for pieces in piece_lists for j, (parts, _) in enumerate(pieces)]
    for parts, _ in flat:
        if isinstance(parts, str):
            raise TypeError("encode_segments takes ChatTemplate.pieces (text split into template and content parts), "
                            "not rendered text")
    ids = iter(tokenizer.encode_template_batch([p for p, _ in flat], [c for _, c in flat]))
    encoded = []
    for pieces in piece_lists:
        x: list[int] = []
        m: list[bool] = []
        for _, trainable in pieces:
            piece = next(ids) + ([tokenizer.eos_id] if trainable and append_eos else [])
            x += piece
            m += [trainable] * len(piece)
        encoded.append((x, m))
    return encoded


def _fit_example(tokens: list[int], trainable: list[bool], max_seq_len: int, skip_overlength: bool) -> str | None:
    """What happens to an example: None (kept whole), "truncated" (to max_seq_len + 1 tokens), "skipped_overlength",
    or "skipped_no_target" (no trainable position left); the non-None ones are counted in the stats."""
    if len(tokens) - 1 > max_seq_len and skip_overlength:
        return "skipped_overlength"
    if not any(trainable[1:max_seq_len + 1]):
        return "skipped_no_target"
    return "truncated" if len(tokens) - 1 > max_seq_len else None
