"""The console chat, driven as a person would: in a real pseudo-terminal (pexpect), through a pipe, and with --prompt.

The model is a tiny random Transformer with a freshly trained tokenizer, saved as a chat-ready model directory. Its
answers are garbage, so the tests assert on structure (streamed text, the prompt coming back, commands), never on
content. The stop tokens are pushed far down in its logits, so an answer always runs to --max-new-tokens: long enough
to be interrupted, and a known length.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli_demo
from model import ModelConfig, Transformer, save_model
from model import chat as chat_module
from model.generation import SamplingConfig, default_stop_ids
from utils.templates import get_template
from utils.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n".join(["你好，我是一个很小的聊天模型。今天天气怎么样？我们一起去公园散步吧。",
                  "The quick brown fox jumps over the lazy dog, twice.",
                  "机器学习是人工智能的一个分支，它让计算机从数据中学习规律。"] * 20)


def build_chat_model_dir(path: Path, max_position_embeddings: int = 2048) -> Path:
    """A chat-ready model dir: trained BPE tokenizer (ChatML) + a tiny random decoder that never emits a stop token."""
    (path / "text").mkdir(parents=True)
    (path / "text" / "text.txt").write_text(TEXT, encoding="utf-8")
    train_tokenizer([path / "text" / "text.txt"], 400, path / "tok", template="chatml")
    tok = Tokenizer.load(path / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                    max_position_embeddings=max_position_embeddings, tie_word_embeddings=False))
    with torch.no_grad():
        # every hidden state carries a large constant feature 0, which the stop tokens' head rows weigh negatively
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[list(default_stop_ids(tok)), 0] = -1.0
    return save_model(model, path / "model", tokenizer=tok)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_chat_model_dir(tmp_path_factory.mktemp("chat"))


def cli(model_dir: Path, *flags: str) -> list[str]:
    return [str(REPO / "cli_demo.py"), "--model", str(model_dir), "--device", "cpu", *flags]


# ---- in a terminal ---------------------------------------------------------------------------------------------------
pexpect = pytest.importorskip("pexpect", reason="pexpect drives the chat in a pseudo-terminal (requirements-dev)")


def spawn(model_dir: Path, *flags: str, sigint_ignored: bool = False):
    """cli_demo.py in a pseudo-terminal; `sigint_ignored`: started as a shell script's `&` job starts it, SIGINT
    ignored."""
    child = pexpect.spawn(sys.executable, cli(model_dir, *flags), cwd=str(REPO), encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 200),
                          env=dict(os.environ, TERM="xterm-256color", LANG="C.UTF-8"),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored
                                                           else signal.SIG_DFL))
    child.expect("Chat-LM-small")
    child.expect_exact("User: ")
    return child


def clear_and_exit(child) -> None:
    """/clear gives a fresh prompt, /exit ends the program (the ending every terminal session here shares)."""
    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.expect_exact("User: ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored-by-the-shell"])
def test_terminal_chat_streams_stops_on_ctrl_c_clears_and_exits(model_dir, sigint_ignored):
    child = spawn(model_dir, "--max-new-tokens", "1500", "--verbose", sigint_ignored=sigint_ignored)
    try:
        child.sendline("")  # an empty line is ignored: the prompt comes straight back
        child.expect_exact("User: ")
        assert "Assistant" not in child.before

        child.sendline("你好，今天天气怎么样？")
        child.expect(r"Assistant(\x1b\[0m)?: ")
        child.expect(r"[^\x1b\s]{4}")  # streamed text is on screen while the answer is still being generated
        child.sendintr()
        child.expect_exact("(answer stopped)")
        child.expect(r"(\d+) tokens \(\d+ in the prompt\), ([\d.]+|-) tokens/s, first token \d+ ms, finish: None")
        assert 0 < int(child.match.group(1)) < 1500  # stopped mid-answer
        child.expect_exact("User: ")

        child.sendintr()  # Ctrl-C at the prompt drops the line and asks again
        child.expect_exact("User: ")
        clear_and_exit(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_terminal_chat_answers_in_full_then_quits_on_ctrl_d(model_dir):
    child = spawn(model_dir, "--max-new-tokens", "40", "--verbose", "--seed", "1")
    try:
        for question in ("第一个问题", "第二个问题"):
            child.sendline(question)
            child.expect("Assistant")
            child.expect(r"40 tokens \((\d+) in the prompt\), [\d.]+ tokens/s, first token \d+ ms, finish: length")
            child.expect_exact("User: ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# ---- scripts ---------------------------------------------------------------------------------------------------------
def run_cli(model_dir: Path, *flags: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cli(model_dir, *flags)], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_prompt_flag_answers_once_and_pipe_input_keeps_the_history(model_dir):
    once = run_cli(model_dir, "--prompt", "你好", "--max-new-tokens", "12", "--verbose", "--seed", "3")
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip() and "User" not in once.stdout and "Chat-LM-small" not in once.stdout
    assert once.stderr.count("tokens/s") == 1 and "12 tokens" in once.stderr

    piped = run_cli(model_dir, "--max-new-tokens", "12", "--verbose",
                    stdin="问题一\n\n问题二\n/clear\n问题三\n/exit\n不会回答\n")
    assert piped.returncode == 0, piped.stderr
    prompts = [int(n) for n in re.findall(r"12 tokens \((\d+) in the prompt\)", piped.stderr)]
    assert len(prompts) == 3  # empty line ignored, nothing answered after /exit
    assert prompts[1] > prompts[0] + 12  # the second question came with the first turn in its prompt
    assert prompts[2] < prompts[1]  # /clear dropped the history


def test_an_answer_that_ends_at_once_is_said_to_be_empty(tmp_path):
    """A model whose first token is a stop token: nothing on stdout, and a note on stderr, not silence."""
    model_dir = build_chat_model_dir(tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    tok = Tokenizer.load(model_dir)
    weights["lm_head.weight"][list(default_stop_ids(tok)), 0] = 10.0
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = run_cli(model_dir, "--prompt", "你好", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "" and "no answer: the model ended it at once" in out.stderr


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    args = cli_demo.build_parser().parse_args(["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.main(args)
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


# ---- the conversation object ---------------------------------------------------------------------------------------
def test_history_is_fed_back_and_the_oldest_turns_are_dropped(tmp_path, monkeypatch):
    path = build_chat_model_dir(tmp_path, max_position_embeddings=120)
    args = cli_demo.build_parser().parse_args(["--model", str(path), "--max-new-tokens", "8", "--seed", "0",
                                               "--system", "你是助手"])
    chat = cli_demo.build_chat(args)
    tok = chat.tokenizer
    prompts: list[list[int]] = []
    real_stream = chat_module.stream
    monkeypatch.setattr(chat_module, "stream", lambda m, ids, *a: prompts.append(ids) or real_stream(m, ids, *a))
    for i in range(8):
        reply = chat.reply(f"问题{i}")
        assert "".join(reply) == reply.text and len(reply.token_ids) == 8
        chat.record(f"问题{i}", f"回答{i}：今天天气怎么样？我们一起去公园散步吧。")  # a known answer length
        assert len(prompts[-1]) <= 120 - 8
        text = tok.decode(prompts[-1])
        assert text.startswith("<|im_start|>system\n你是助手<|im_end|>\n")
        assert text.endswith(f"<|im_start|>user\n问题{i}<|im_end|>\n<|im_start|>assistant\n")
    assert "问题0" in tok.decode(prompts[1]) and "回答0" in tok.decode(prompts[1])  # earlier turns are fed back
    assert "问题0" not in tok.decode(prompts[-1]) and "回答6" in tok.decode(prompts[-1])  # the oldest dropped first
    chat.clear()
    chat.reply("新问题").close()
    assert tok.decode(prompts[-1]) == get_template("chatml").render([{"role": "system", "content": "你是助手"},
                                                                    {"role": "user", "content": "新问题"}])


def test_sampling_flags_reach_the_config(model_dir):
    args = cli_demo.build_parser().parse_args(["--model", str(model_dir), "--temperature", "0", "--top-k", "5",
                                               "--top-p", "0.5", "--repetition-penalty", "1.3",
                                               "--max-new-tokens", "7", "--template", "wenda"])
    chat = cli_demo.build_chat(args)
    tok = chat.tokenizer
    assert chat.template.name == "wenda"
    assert chat.config == SamplingConfig(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=1.3,
                                         max_new_tokens=7, stop_ids=default_stop_ids(tok, "wenda"), seed=None)
