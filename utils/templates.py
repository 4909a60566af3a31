"""Chat templates: one description renders the training text, the loss mask and the Hugging Face jinja string.

Every template is the same five pieces of text around the messages, so `render`, `segments` and `jinja` cannot drift
apart (the tests check the jinja against `transformers.apply_chat_template`). Multi-turn rendering, exactly
(`[...]` is present only when there is a system prompt; `|` separates pieces, not text):

    chatml           [<|im_start|>system\\n{sys}<|im_end|>\\n] <|im_start|>user\\n{q}<|im_end|>\\n | <|im_start|>assistant\\n
                     | {a}<|im_end|> | \\n   ... repeated per turn (Qwen1.5 / LLaMA-Factory `qwen` layout)
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
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")


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
    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Rendered text as consecutive (piece, trainable) pairs; empty pieces are dropped."""
        system, turns = _split_system(messages, self.default_system)
        out: list[tuple[str, bool]] = []
        if system is not None and not self.system_in_user:
            out.append((_fill(self.system, system), False))
        for i, m in enumerate(turns):
            if m["role"] == "user":
                content = m["content"]
                if i == 0 and system is not None and self.system_in_user:
                    content = _fill(self.system, system) + content
                if i > 0:
                    out.append((self.turn_sep, False))
                out.append((_fill(self.user, content), False))
                if i + 1 < len(turns) or add_generation_prompt:
                    out.append((self.assistant_prefix, False))
            else:
                out.append((_fill(self.assistant, m["content"]), True))
                out.append((self.assistant_suffix, False))
        return [(p, t) for p, t in out if p]

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
                     f"{{%- if not loop.last or add_generation_prompt %}}{{{{ {q(self.assistant_prefix)} }}}}{{%- endif %}}"
                     f"{{%- elif m['role'] == 'assistant' %}}"
                     f"{{{{ {filled(self.assistant, 'm[' + q('content') + ']')} + {q(self.assistant_suffix)} }}}}"
                     "{%- endif %}{%- endfor %}")
        return "".join(parts)


def _fill(fmt: str, content: str) -> str:
    head, tail = fmt.split("{content}")  # not str.format: content may hold braces
    return head + content + tail


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
