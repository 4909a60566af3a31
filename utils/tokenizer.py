"""Train and load tokenizers: our byte-level BPE, Qwen2 (vocab.json + merges.txt or tokenizer.json) and SentencePiece
(`tokenizer.model`: LLaMA, Baichuan). Everything becomes one `tokenizers.Tokenizer`, so encoding is fast and batched
whatever the source, and ids equal `transformers.AutoTokenizer` on the same files (tests/test_tokenizer.py).

Why the pre-tokenizer matters: BPE counts every distinct pre-token ("word") in RAM. Chinese has no spaces, so a
whitespace pre-tokenizer turns each clause into one huge unique word, so RAM grows with the corpus.
Ours splits CJK runs into chunks of at most CJK_CHUNK (6) characters, digits one by one, punctuation and letters
apart, so words stay short and merges still learn the common 1-6 character Chinese words and phrases. Memory is then
bounded twice: a corpus larger than `sample_bytes` is subsampled deterministically, and the word table is capped at
`max_words` distinct words (rare ones are dropped), so peak RSS does not grow with the corpus.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import resource
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from utils.io import atomic_write_text, read_json, write_json
from utils.templates import TEMPLATES, get_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]  # fixed ids 0, 1, 2, 3 in our tokenizers
CJK_CHUNK = 6
MAX_VOCAB_SIZE = 2**20  # --vocab-size limit: the trainer allocates per entry up front; Qwen2 has 151646
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
# CJK chunks | English contractions | letter runs (a leading space or tab, at most 32 letters) | single digits |
# punctuation/symbol runs | newlines | other whitespace. Isolated splitting keeps every character: lossless.
PRETOKENIZE_REGEX = (rf"[{_CJK}]{{1,{CJK_CHUNK}}}"
                     r"|(?i:'s|'t|'re|'ve|'m|'ll|'d)"
                     rf"|[^\S\r\n]?[[\p{{L}}\p{{M}}]&&[^{_CJK}]]{{1,32}}"
                     r"|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]{1,8}[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's pre-tokenizer (transformers Qwen2Tokenizer), used for vocab.json + merges.txt directories
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and the chat template the rest of the project needs.

    eos_id is the end-of-text token (ours and Qwen2 `<|endoftext|>`, SentencePiece `</s>`); pad_id is ours `<|pad|>`,
    the tokenizer_config pad token when there is one (Qwen2: `<|endoftext|>`), else eos; bos_id is None unless the
    vocabulary has one (SentencePiece `<s>`). Chat stop tokens come from the template's stop_strings.
    """

    def __init__(self, backend: _HFTokenizer, *, eos: str, pad: str | None = None, bos: str | None = None,
                 default_template: str = "raw"):
        self.backend = backend
        self.eos_id = self._required_id(eos)
        self.pad_id = self._required_id(pad) if pad is not None else self.eos_id
        self.bos_id = self._required_id(bos) if bos is not None else None
        self.default_template = get_template(default_template).name

    def _required_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_bos: bool = False, continuation: bool = False, special: bool = True) -> list[int]:
        """`continuation`: the text continues a sequence (a chat template's pieces after the first), so it gets no
        SentencePiece dummy-prefix "▁", as it would not inside a whole-text encode.
        `special=False`: added-token text in `text` (`<|im_end|>`, `</s>`, ...) is plain text, encoded by the model as
        any other characters, never as those tokens. Text from users or a corpus is always encoded so (SFT data, chat
        prompts, pretraining documents), so it cannot inject a turn boundary or an end of text."""
        ids = self._backend(continuation, special).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], continuation: bool = False, special: bool = True) -> list[list[int]]:
        backend = self._backend(continuation, special)
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_template_batch(self, pieces: Sequence[Sequence[tuple[str, bool]]],
                              continuation: Sequence[bool]) -> list[list[int]]:
        """Ids of chat-template pieces, each a sequence of (text, is_template) parts (`ChatTemplate.pieces`), with
        `continuation` per piece as in `encode`.

        Only the template's own text is searched for added tokens (its markers `<|im_start|>`, `<|im_end|>`, `<s>`,
        `</s>` become their ids); the messages' text is plain (`special=False`), so `<|im_end|>` typed by a user or
        found in a corpus is ordinary tokens. The rest is split at the markers and encoded exactly as `encode` splits
        a whole text at its added tokens (a first-word prefix only where the backend would give one), so a piece
        whose content holds no marker text gets the same ids as `encode(piece)`."""
        if len(pieces) != len(continuation):
            raise ValueError(f"{len(pieces)} pieces but {len(continuation)} continuation flags")
        texts: tuple[list[str], list[str]] = ([], [])  # plain text with a first-word prefix / without
        plans: list[list[list[int] | tuple[int, int]]] = []  # per piece: known ids, or a (texts list, index) slot
        for parts, cont in zip(pieces, continuation):
            chunks: list[list | int] = [["", False]]  # [text, holds content] between markers, and marker ids
            for text, is_template in parts:
                for item in self._split_markers(text) if is_template else (text,):
                    if isinstance(item, int):
                        chunks += [item, ["", False]]
                    else:
                        chunks[-1][0] += item
                        chunks[-1][1] |= not is_template
            plan: list[list[int] | tuple[int, int]] = []
            for k, chunk in enumerate(chunks):
                if isinstance(chunk, int):
                    plan.append([chunk])
                elif chunk[0]:
                    which = 0 if (not cont if k == 0 else self._prefix_after_marker[cont]) else 1
                    if chunk[1]:
                        plan.append((which, len(texts[which])))
                        texts[which].append(chunk[0])
                    else:  # template text alone ("\n", "assistant\n"): the same few strings every time
                        plan.append(self._template_ids(chunk[0], which))
            plans.append(plan)
        encoded = [self.encode_batch(texts[0], special=False) if texts[0] else [],
                   self.encode_batch(texts[1], continuation=True, special=False) if texts[1] else []]
        return [[i for slot in plan for i in (encoded[slot[0]][slot[1]] if isinstance(slot, tuple) else slot)]
                for plan in plans]

    def _template_ids(self, text: str, which: int) -> list[int]:
        cache = self._split_cache
        key = (text, which)
        ids = cache.get(key)
        if ids is None:
            ids = self.encode(text, continuation=which == 1, special=False)
            if len(cache) < 4096:
                cache[key] = ids
        return ids

    def _backend(self, continuation: bool, special: bool) -> _HFTokenizer:
        if special:
            return self._continuation_backend if continuation else self.backend
        return self._plain_continuation_backend if continuation else self._plain_backend

    @cached_property
    def _continuation_backend(self) -> _HFTokenizer:
        """The backend without a first-word prefix: a Metaspace pre-tokenizer's dummy "▁", a Prepend("▁")
        normalizer's (Llama's tokenizer.json), ByteLevel's add_prefix_space. Ours and Qwen2's have none and are used
        as they are (found from the two components, without serializing the vocabulary)."""
        spec = {k: json.loads(c.__getstate__()) if c is not None else None
                for k, c in (("pre_tokenizer", self.backend.pre_tokenizer), ("normalizer", self.backend.normalizer))}
        if not _drop_first_word_prefix(spec):
            return self.backend
        return _HFTokenizer.from_str(json.dumps(json.loads(self.backend.to_str()) | spec))

    @cached_property
    def _plain_backend(self) -> _HFTokenizer:
        """The backend with no added tokens to match: their text goes through the normalizer, pre-tokenizer and model
        like any other text (the model alone never forms them: ours and Qwen2's pre-tokenizers split `<|`, `|>`;
        SentencePiece never merges into a control piece). Decoding stays with `backend`."""
        return _without_added_tokens(self.backend)

    @cached_property
    def _plain_continuation_backend(self) -> _HFTokenizer:
        if self._continuation_backend is self.backend:
            return self._plain_backend
        return _without_added_tokens(self._continuation_backend)

    @cached_property
    def _markers(self) -> tuple[dict[str, int], re.Pattern | None]:
        """Every added token's text -> id, and a regex that finds them leftmost-longest (as tokenizers does)."""
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.content}
        if not added:
            return added, None
        return added, re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))

    def _split_markers(self, text: str) -> list[str | int]:
        """Template text split into plain text and added-token ids."""
        cache = self._split_cache
        out = cache.get(text)
        if out is None:
            added, pattern = self._markers
            out, pos = [], 0
            for m in pattern.finditer(text) if pattern is not None else ():
                out += [text[pos:m.start()], added[m.group()]]
                pos = m.end()
            out.append(text[pos:])
            if len(cache) < 4096:
                cache[text] = out
        return out

    @cached_property
    def _split_cache(self) -> dict:
        """Template text -> its split at markers, (template text, prefix kind) -> ids: templates repeat a few
        strings."""
        return {}

    @cached_property
    def _prefix_after_marker(self) -> tuple[bool, bool]:
        """For (first piece, continuation piece): whether text that follows an added token gets the first-word
        prefix when the backend encodes the whole piece. A Metaspace "first" pre-tokenizer gives it only at the start
        of the text; a Prepend normalizer and ByteLevel's add_prefix_space give it after every added token. Found by
        encoding `<marker>a` with both backends."""
        added, _ = self._markers
        plain, cont = (b.encode("a", add_special_tokens=False).ids
                       for b in (self._plain_backend, self._plain_continuation_backend))
        if not added or plain == cont:
            return False, False
        marker = next(iter(added))
        return tuple(b.encode(marker + "a", add_special_tokens=False).ids[1:] == plain
                     for b in (self.backend, self._continuation_backend))

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """The text of `ids`. A byte-level token may end inside a multi-byte UTF-8 character, so ids can hold bytes
        that form no character (a character cut at the end, or its pieces out of order): errors="replace" shows them
        as U+FFFD, as `tokenizers` does; "ignore" drops them (what a generated answer shows, through TextDecoder)."""
        if errors == "replace":
            return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return TextDecoder(self, skip_special_tokens, errors).push(ids, final=True)

    def token_bytes(self, i: int, first: bool = False) -> bytes:
        """The UTF-8 bytes token i adds to decoded text (first: as the first token of it, which a Metaspace decoder
        treats apart; a leading-space Strip is TextDecoder's): byte-level tokens through the byte alphabet,
        SentencePiece byte-fallback tokens (`<0xE4>`) as their byte."""
        found = None if first else self._token_bytes.get(i)
        if found is None:
            token = self.backend.id_to_token(int(i))
            found = b"" if token is None else self._byte_decoding[0](token, first)
            if not first:
                self._token_bytes[i] = found
        return found

    @cached_property
    def _token_bytes(self) -> dict[int, bytes]:
        return {}

    @cached_property
    def _byte_decoding(self) -> tuple[Callable[[str, bool], bytes], int]:
        """(token text, first -> its bytes; leading spaces the decoder strips from the text), from the backend's
        decoder. A decoder not known here decodes each token alone."""
        decoder = self.backend.decoder
        if decoder is None:  # tokenizers joins the tokens with spaces
            return (lambda token, first: (b"" if first else b" ") + token.encode("utf-8")), 0
        known = _byte_decoding(json.loads(decoder.__getstate__()))
        return known or ((lambda token, first: decoder.decode([token]).encode("utf-8")), 0)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens (what skip_special_tokens leaves out)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ---------------------------------------------------------------- files
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json into out_dir, each file atomically (a model dir keeps its
        other files)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.backend.to_str())
        write_json(out / "tokenizer_config.json", self.hf_config())

    def hf_config(self) -> dict:
        """tokenizer_config.json for `transformers.AutoTokenizer`: special tokens, and every template whose markers
        this vocabulary has (the default one under the name "default", as transformers expects)."""
        name = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        added = self.backend.get_added_tokens_decoder()
        specials = [t.content for t in added.values() if t.special]
        usable = [t for t in TEMPLATES.values() if _markers_known(t, set(specials))]
        chat_templates = [{"name": "default", "template": get_template(self.default_template).jinja()}]
        chat_templates += [{"name": t.name, "template": t.jinja()} for t in usable if t.name != self.default_template]
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
            "unk_token": None,
            "additional_special_tokens": [s for s in specials if s not in {name(self.bos_id), name(self.eos_id),
                                                                            name(self.pad_id)}],
            "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                              "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                                     for i, t in sorted(added.items())},
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template_name": self.default_template,
            "chat_template": chat_templates,
        }

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Our tokenizer dir; a Qwen2 dir (tokenizer.json, or vocab.json + merges.txt); a SentencePiece dir
        (tokenizer.model). A tokenizer.json file path works too."""
        path = Path(path)
        if path.is_file() and path.name == "tokenizer.json":
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        if (path / "tokenizer.json").is_file():
            backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend = _qwen2_from_files(path, config)
        elif (path / "tokenizer.model").is_file():
            backend = _from_sentencepiece(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json, vocab.json + merges.txt, or tokenizer.model")
        return cls(backend, **_special_roles(backend, config, path))


class TextDecoder:
    """The text of token ids given a few at a time (a stream), in complete characters only. A byte-level token can
    end inside a multi-byte UTF-8 character: its bytes wait for the rest of the character. Bytes that can never form
    one (an invalid sequence, or a character still incomplete when the ids end: `final=True`) are dropped with
    errors="ignore" (the default), shown as U+FFFD with "replace" (as `Tokenizer.decode` does). The pieces, joined,
    equal `tokenizer.decode(ids, skip_special_tokens)` whenever that holds no U+FFFD (for the decoders of byte-level
    BPE and SentencePiece tokenizers: `_byte_decoding`; any other decodes each token alone).

        decoder = TextDecoder(tokenizer)
        for token in tokens: print(decoder.push([token]), end="")
        print(decoder.push([], final=True))
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, errors: str = "ignore"):
        self.tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._strip = tokenizer._byte_decoding[1]  # leading spaces still to strip (SentencePiece's dummy prefix)
        self._first = True

    def push(self, ids: Iterable[int], final: bool = False) -> str:
        """The complete characters that `ids` add (final: the last call; nothing is held back after it)."""
        data = []
        for i in ids:
            if int(i) not in self._skip:
                data.append(self.tokenizer.token_bytes(int(i), self._first))
                self._first = False
        text = self._utf8.decode(b"".join(data), final)
        if self._strip and text:
            n = min(self._strip, len(text) - len(text.lstrip(" ")))
            text = text[n:]
            self._strip = 0 if text else self._strip - n
        return text


def _byte_level_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for (printable bytes are themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoding(spec: dict) -> tuple[Callable[[str, bool], bytes], int] | None:
    """A tokenizer.json decoder as (token -> bytes, leading spaces stripped), for the decoders byte-level BPE and
    SentencePiece models use: ByteLevel; Replace, ByteFallback, Fuse, Strip (a leading one) and Metaspace, alone or
    in a Sequence. None for any other."""
    steps = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    replaces: list[tuple[str, str]] = []
    byte_level = byte_fallback = fused = False
    metaspace: tuple[str, bool] | None = None
    strip = 0
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not (replaces or byte_fallback or metaspace):
            byte_level = True
        elif kind == "Replace" and "String" in step.get("pattern", {}) and not byte_level:
            replaces.append((step["pattern"]["String"], step["content"]))
        elif kind == "ByteFallback" and not byte_level:
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and step.get("content") == " " and not step.get("stop") and fused:
            strip += step.get("start", 0)
        elif kind == "Metaspace" and not (byte_level or metaspace):
            # the first token loses every replacement character (not only its first), later ones become spaces
            metaspace = step.get("replacement", "▁"), step.get("prepend_scheme", "always") != "never"
        else:
            return None
    if byte_level:
        alphabet = _byte_level_bytes()

        def token_bytes(token: str, first: bool) -> bytes:
            try:
                return bytes(alphabet[c] for c in token)
            except KeyError:  # a token outside the alphabet (an added one): its own text, as tokenizers does
                return token.encode("utf-8")
        return token_bytes, strip

    def piece_bytes(token: str, first: bool) -> bytes:
        for old, new in replaces:
            token = token.replace(old, new)
        if metaspace:
            token = token.replace(metaspace[0], "" if first and metaspace[1] else " ")
        byte = _BYTE_PIECE.fullmatch(token) if byte_fallback else None
        return bytes([int(byte.group(1), 16)]) if byte else token.encode("utf-8")
    return piece_bytes, strip


def _drop_first_word_prefix(spec: dict) -> bool:
    """Edit a tokenizer.json's "pre_tokenizer" / "normalizer" entries in place so that no prefix space is added to
    the first word; True when anything changed."""
    changed = False
    pre = spec.get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Metaspace" and p.get("prepend_scheme") != "never":
            p["prepend_scheme"], changed = "never", True
        if p.get("type") == "ByteLevel" and p.get("add_prefix_space"):
            p["add_prefix_space"], changed = False, True
    norm = spec.get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kept = [n for n in parts if n.get("type") != "Prepend"]
    if len(kept) < len(parts):
        spec["normalizer"], changed = {"type": "Sequence", "normalizers": kept} if kept else None, True
    return changed


def _without_added_tokens(backend: _HFTokenizer) -> _HFTokenizer:
    """A copy of `backend` that matches no added tokens (the model's own vocabulary is unchanged)."""
    spec = json.loads(backend.to_str())
    if not spec.get("added_tokens"):
        return backend
    spec["added_tokens"] = []
    return _HFTokenizer.from_str(json.dumps(spec))


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _special_roles(backend: _HFTokenizer, config: dict, path: Path) -> dict:
    """eos / pad / bos strings and the default template, from the config or the vocabulary."""
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    has = lambda t: t in specials  # noqa: E731  (a plain vocab entry such as Qwen2's "<s>" is no bos)
    eos = next((t for t in ["<|endoftext|>", _token_str(config.get("eos_token")), "</s>"] if has(t)), None)
    if eos is None:
        raise ValueError(f"{path}: no end-of-text special token (<|endoftext|>, the config's eos_token, </s>)")
    pad = next((t for t in ["<|pad|>", _token_str(config.get("pad_token"))] if has(t)), None)
    bos = next((t for t in [_token_str(config.get("bos_token")), "<s>"] if has(t)), None)
    template = config.get("chat_template_name")
    if template is None:
        template = "qwen" if has("<|im_start|>") else "llama2" if has("<s>") and has("</s>") else "raw"
    return {"eos": eos, "pad": pad, "bos": bos, "default_template": template}


def _markers_known(template, specials: set[str]) -> bool:
    """A template that uses <|im_start|> / <s> markers is only offered where they are special tokens."""
    text = template.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], False)
    return all(m in specials for m in ("<|im_start|>", "<s>", "</s>") if m in text)


# -------------------------------------------------------------------- Qwen2 and SentencePiece conversion
def _qwen2_from_files(path: Path, config: dict) -> _HFTokenizer:
    """vocab.json + merges.txt with Qwen2's NFC normalizer, pre-tokenizer regex, byte-level decoder and specials."""
    vocab = read_json(path / "vocab.json")
    lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()  # the shared copy has CRLF endings
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tk = _HFTokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    added = {i: t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
    if (path / "added_tokens.json").is_file():
        added.update({str(i): t for t, i in read_json(path / "added_tokens.json").items()})
    for i, content in sorted(added.items(), key=lambda x: int(x[0])):  # ids follow the vocab, in order
        tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tk.token_to_id(content) != int(i):
            raise ValueError(f"{path}: added token {content!r} should have id {i}, got {tk.token_to_id(content)}")
    return tk


def _from_sentencepiece(model_file: Path) -> _HFTokenizer:
    """SentencePiece BPE -> tokenizers BPE, as transformers' LlamaTokenizer converts it (merges ordered by the merged
    piece's id, byte fallback, Metaspace with the dummy prefix only at the start of the text), so ids match it."""
    import sentencepiece as spm  # runtime dependency, only needed here

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_file}: not a SentencePiece model: {e}") from None
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece in pieces:  # transformers.tokenization_utils_base.generate_merges
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges = [m for _, m in sorted(enumerate(merges), key=lambda x: (vocab[x[1][0] + x[1][1]], len(x[1][0]), x[0]))]
    unk = next((p for i, p in enumerate(pieces) if sp.is_unknown(i)), None)
    tk = _HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                 byte_fallback=any(sp.is_byte(i) for i in range(len(pieces)))))
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if dummy_prefix else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if dummy_prefix else []))
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for i, p in enumerate(pieces)
                           if sp.is_control(i) or sp.is_unknown(i)])
    return tk


# -------------------------------------------------------------------- training corpus
def corpus_files(files_or_dir: str | Path | Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files). A prepared dir trains on train-*.parquet and holds out valid-*.parquet;
    any other dir contributes every parquet / text / JSON file under it."""
    items = [files_or_dir] if isinstance(files_or_dir, (str, Path)) else list(files_or_dir)
    train: list[Path] = []
    heldout: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            shards = sorted(item.glob("train-*.parquet"))
            if shards:
                train += shards
                heldout += sorted(item.glob("valid-*.parquet"))
            else:
                train += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in
                                (".parquet", *TEXT_SUFFIXES, *JSON_SUFFIXES))
        elif item.is_file():
            train.append(item)
        else:
            raise FileNotFoundError(f"training data not found: {item}")
    if not train:
        raise ValueError(f"no training files (train-*.parquet, *.parquet, *.txt, *.json, *.jsonl) in {items}")
    return train, heldout


def file_text_bytes(path: Path) -> int:
    """Text bytes in a file, cheaply: parquet metadata (uncompressed prompt/response size) or the file size."""
    if path.suffix.lower() != ".parquet":
        return path.stat().st_size
    meta = _parquet(path).metadata
    return sum(rg.column(c).total_uncompressed_size for rg in (meta.row_group(i) for i in range(meta.num_row_groups))
               for c in range(rg.num_columns) if rg.column(c).path_in_schema in ("prompt", "response", "text"))


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ValueError(f"{path}: cannot read parquet: {e}") from None


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one file, read by the corpus readers (encoding detection, streamed JSON arrays, UTF-8 BOM).
    Parquet: prompt + "\\n" + response (as pretraining sees them) or a text column; JSON lines / a JSON array: the
    string values of each object joined by newlines; text: one line at a time. Bad input raises a ValueError that
    names the file and line: a tokenizer should not silently train on less than it was given."""
    from utils.corpora import ReaderOptions, Tally, json_objects, parquet_rows, text_lines

    tally, opts = Tally(), ReaderOptions()
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            names = set(_parquet(path).schema_arrow.names)
            cols = ["prompt", "response"] if {"prompt", "response"} <= names else ["text"] if "text" in names else None
            if cols is None:
                raise ValueError(f"{path}: parquet needs columns prompt+response or text, has {sorted(names)}")
            parts = ([row[c] or "" for c in cols] for _, row in parquet_rows(path, cols, tally, batch_rows=4096))
        elif suffix in JSON_SUFFIXES:
            parts = (_strings(obj) for _, obj in json_objects(path, opts, tally))
        else:
            parts = ([line] for _, line in text_lines(path, opts, tally))
        for texts in parts:
            _raise_on_drop(path, tally)
            doc = "\n".join(texts)
            if doc.strip():
                yield doc
        _raise_on_drop(path, tally)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


def _raise_on_drop(path: Path, tally) -> None:
    if tally.dropped:
        e = tally.examples[0]
        raise ValueError(f"{path}: cannot read: {e['reason']} at {e['where']}: {e['detail']}")


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _heldout_doc(doc: str) -> bool:
    """Deterministic ~1% hold-out when the data has no valid split."""
    import zlib

    return zlib.crc32(doc.encode("utf-8")) % 100 == 0


class _Sampler:
    """Streams training documents, keeping each with probability sample_bytes / total (seeded, so the same corpus
    gives the same sample), and counts what went in. With hold_out, ~1% of documents are never trained on and the
    first of them, up to heldout_chars, are kept for the report (memory does not grow with the corpus)."""

    def __init__(self, files: list[Path], keep: float, seed: int, hold_out: bool, heldout_chars: int = 2_000_000):
        self.files, self.keep, self.hold_out, self.heldout_chars = files, keep, hold_out, heldout_chars
        self.rng = np.random.default_rng(seed)
        self.docs = self.chars = self.bytes = self.heldout_size = 0
        self.heldout: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            for doc in iter_documents(path):
                if self.hold_out and _heldout_doc(doc):
                    if self.heldout_size < self.heldout_chars:
                        self.heldout.append(doc)
                        self.heldout_size += len(doc)
                    continue
                if self.keep < 1.0 and self.rng.random() >= self.keep:
                    continue
                size = len(doc.encode("utf-8"))
                self.docs += 1
                self.chars += len(doc)
                self.bytes += size
                yield doc


class WordCounter:
    """Pre-token counts with a hard cap on distinct words: the BPE trainer's memory is about 1.8 KB per distinct
    word, so when the table passes max_words the rarest words are dropped (count below a rising threshold) until
    it is half full. The merges come from the frequent words, which are kept exactly."""

    def __init__(self, max_words: int):
        self.max_words = max_words
        self.counts: dict[str, int] = {}
        self.min_count = 1  # words seen fewer times than this may have been dropped
        self._split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")

    def add(self, text: str) -> None:
        counts = self.counts
        for word, _ in self._split.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
        if len(counts) > self.max_words:
            self.prune(self.max_words // 2)

    def prune(self, target: int) -> None:
        while len(self.counts) > target:
            self.min_count += 1
            self.counts = {w: c for w, c in self.counts.items() if c >= self.min_count}

    def sequences(self, batch: int = 8192) -> Iterator[list[str]]:
        """Each word repeated by its count, in batches, for `train_from_iterator` (which takes text, not counts)."""
        out: list[str] = []
        for word, count in self.counts.items():
            while count:
                n = min(count, batch - len(out))
                out += [word] * n
                count -= n
                if len(out) == batch:
                    yield out
                    out = []
        if out:
            yield out


def new_bpe() -> _HFTokenizer:
    """Our untrained byte-level BPE: no normalizer (lossless), CJK-chunked pre-tokenizer, the specials at ids 0-3."""
    tk = _HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def chars_per_token(tok: Tokenizer, docs: list[str]) -> float | None:
    if not docs:
        return None
    tokens = sum(len(ids) for i in range(0, len(docs), 512) for ids in tok.encode_batch(docs[i:i + 512], special=False))
    return sum(map(len, docs)) / max(tokens, 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_vocab_size(vocab_size: int) -> None:
    """--vocab-size must hold the special tokens and the 256 byte tokens, and stay at most MAX_VOCAB_SIZE: the BPE
    trainer allocates per requested entry up front (1e9 asks it for 70 GB, and Rust aborts the process)."""
    floor = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"--vocab-size must be an integer, got {vocab_size!r}")
    if vocab_size < floor:
        raise ValueError(f"--vocab-size {vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens + 256 byte "
                         f"tokens need at least {floor}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size} is too large: at most {MAX_VOCAB_SIZE} (2**20); "
                         "Qwen2's vocabulary has 151646 tokens")


def train_tokenizer(files_or_dir, vocab_size: int, out_dir, sample_bytes: int | None = None, *,
                    min_frequency: int = 2, template: str = "chatml", compare: str | Path | None = None,
                    max_words: int = 1_000_000, heldout_chars: int = 2_000_000, seed: int = 0,
                    show_progress: bool = False) -> dict:
    """Train our BPE on the training files, save it to out_dir (each file atomically; other files there, such as a
    model's config and weights, are kept) and return the report (also written to out_dir/tokenizer_report.json).
    Memory is bounded twice: by the byte sample and by max_words distinct pre-tokens.
    compare: another tokenizer dir (e.g. Qwen2) measured on the same held-out text."""
    check_vocab_size(vocab_size)
    if not _markers_known(get_template(template), set(SPECIAL_TOKENS)):
        raise ValueError(f"template {template!r} needs markers our vocabulary lacks; use one of "
                         f"{[n for n, t in TEMPLATES.items() if _markers_known(t, set(SPECIAL_TOKENS))]}")
    train_files, heldout_files = corpus_files(files_or_dir)
    total = sum(map(file_text_bytes, train_files))
    keep = 1.0 if not sample_bytes or total <= sample_bytes else sample_bytes / total
    sampler = _Sampler(train_files, keep, seed, hold_out=not heldout_files, heldout_chars=heldout_chars)

    start = time.perf_counter()
    words = WordCounter(max_words)
    with _progress(show_progress) as progress:
        task = progress.add_task("counting words", total=int(total * keep))
        for doc in sampler:
            words.add(doc)
            progress.update(task, completed=sampler.bytes)
    if sampler.docs == 0:
        raise ValueError(f"empty corpus: no non-blank documents in {[str(p) for p in train_files]}")
    distinct, dropped_below = len(words.counts), words.min_count
    tk = new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(words.sequences(), trainer=trainer, length=sum(words.counts.values()))
    del words
    seconds = time.perf_counter() - start
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tk.token_to_id(t) == i, (t, tk.token_to_id(t))
    tok = Tokenizer(tk, eos="<|endoftext|>", pad="<|pad|>", default_template=template)

    heldout: list[str] = []
    for doc in (d for p in heldout_files for d in iter_documents(p)) if heldout_files else sampler.heldout:
        if sum(map(len, heldout)) >= heldout_chars:
            break
        heldout.append(doc)
    report = {
        "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "train_seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "corpus_bytes": total, "sample_fraction": round(keep, 6),
        "trained_docs": sampler.docs, "trained_chars": sampler.chars, "trained_bytes": sampler.bytes,
        "distinct_words": distinct, "words_dropped_below_count": dropped_below,
        "heldout": "valid split" if heldout_files else "1% of documents", "heldout_chars": sum(map(len, heldout)),
        "chars_per_token": _round(chars_per_token(tok, heldout)), "min_frequency": min_frequency,
    }
    if shortfall := vocab_shortfall(report):
        report["warning"] = shortfall
    if compare is not None:
        other = Tokenizer.load(compare)
        report.update(compare=str(compare), compare_vocab_size=other.vocab_size,
                      compare_chars_per_token=_round(chars_per_token(other, heldout)))
        if report["chars_per_token"] and report["compare_chars_per_token"]:
            report["chars_per_token_ratio"] = _round(report["chars_per_token"] / report["compare_chars_per_token"])
    _write_files(tok, report, Path(out_dir))
    return report


def vocab_shortfall(report: dict) -> str | None:
    """One line when the trained vocabulary is smaller than asked for, saying why: BPE stops merging when no pair of
    adjacent tokens occurs --min-frequency times in the training text, so too little text (or too few distinct
    words) leaves the rest of the vocabulary empty. None when the size was reached."""
    got, asked = report["vocab_size"], report["requested_vocab_size"]
    if got >= asked:
        return None
    return (f"warning: --vocab-size {asked:,} asked for, {got:,} tokens learned: in the training text "
            f"({report['trained_chars']:,} characters, {report['distinct_words']:,} distinct words) no further pair "
            f"occurs {report['min_frequency']}+ times (--min-frequency); train on more text or ask for {got:,} or "
            f"fewer")


def _write_files(tok: Tokenizer, report: dict, out: Path) -> None:
    """Write the tokenizer files into a temporary dir inside `out`, then move each into `out` with os.replace: a
    model dir keeps its config and weights, and no reader sees a half-written tokenizer file."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
        tok.save(tmp)
        write_json(Path(tmp) / "tokenizer_report.json", report)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _progress(enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tokenizer", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        if k != "warning":
            table.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(table)
    if report.get("warning"):  # one line on stderr, however narrow the terminal
        Console(stderr=True).print(report["warning"], style="yellow", markup=False, highlight=False, soft_wrap=True)


# -------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--data", nargs="+", default=["data/corpus"],
                        help="prepared dir (trains on train-*.parquet, reports on valid-*.parquet) or parquet / "
                             "text / JSON files and dirs")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size including special tokens")
    parser.add_argument("--out", default="data/tokenizer", help="output dir (tokenizer.json, tokenizer_config.json, "
                                                                "tokenizer_report.json)")
    parser.add_argument("--sample-bytes", type=int, default=256 * 2**20,
                        help="train on a deterministic sample of about this many text bytes when the corpus is "
                             "larger (bounds memory); 0 = use everything")
    parser.add_argument("--max-words", type=int, default=1_000_000,
                        help="cap on distinct pre-tokens held for training (about 1.8 KB of RAM each); rarer ones "
                             "are dropped past it")
    parser.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
    parser.add_argument("--template", default="chatml", choices=sorted(TEMPLATES),
                        help="chat template written into tokenizer_config.json as the default")
    parser.add_argument("--compare", default=None,
                        help="another tokenizer dir (e.g. ../shared/corpora/tokenizers/qwen2) to measure on the same "
                             "held-out text")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show the trainer's progress bars")


def main(args: argparse.Namespace) -> None:
    report = train_tokenizer(args.data, args.vocab_size, args.out, args.sample_bytes or None,
                             min_frequency=args.min_frequency, max_words=args.max_words, template=args.template,
                             compare=args.compare, seed=args.seed, show_progress=args.progress)
    print_report(report)
    print(f"saved to {args.out}")
