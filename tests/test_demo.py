"""The front door: `python train.py demo` on the bundled samples, and `train.ipynb` executed top to bottom. Both
produce a chat-ready model directory that transformers loads and cli_demo.py answers from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SLOW_TIMEOUT

REPO = Path(__file__).resolve().parents[1]


def check_chat_ready(model_dir: Path, answers: bool = True) -> None:
    """transformers loads the model and its chat template; cli_demo.py answers a question (or, for a model trained
    too briefly to answer, says that it ended the answer at once)."""
    from model import load_model
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - load_model(model_dir)(ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                      add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    out = subprocess.run([sys.executable, "cli_demo.py", "--model", str(model_dir),
                          "--prompt", "地球上最大的海洋是哪个？", "--temperature", "0", "--max-new-tokens", "30"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() if answers else out.stdout.strip() or "no answer" in out.stderr


@pytest.mark.slow
def test_demo_end_to_end(demo):
    out, stdout = demo
    assert "the demo model answers" in stdout
    for stage in ("pretrain", "sft"):
        log = (out / stage / "train.log").read_text().splitlines()
        losses = [float(line.split(" loss ")[1].split()[0]) for line in log if " step " in line and "eval" not in line
                  and " loss " in line]
        assert losses[-1] < losses[0] - 0.5, (stage, losses)
    check_chat_ready(out / "sft" / "latest")


@pytest.mark.slow
def test_terminal_chat_on_the_demo_model(demo):
    """A person at a terminal (pexpect pty): asks a question from the demo data, sees a Chinese answer stream in,
    /clear, /exit. (What a 1.3M-parameter model recalls varies with the data, so the answer's content is not pinned;
    Ctrl-C mid-answer is tested in test_cli_demo.py on a model that never stops by itself.)"""
    from test_cli_demo import clear_and_exit, spawn  # the same pty driver (skips this test without pexpect)
    child = spawn(demo[0] / "sft" / "latest", "--temperature", "0", "--max-new-tokens", "60")
    try:
        child.sendline("地球上最大的海洋是哪个？")
        child.expect(r"Assistant(\x1b\[0m)?: ")
        child.expect(r"[\u4e00-\u9fff]{2}")  # Chinese text streamed to the screen
        child.expect_exact("User: ")
        clear_and_exit(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


NOTEBOOK_STEPS = "PRETRAIN_STEPS, SFT_STEPS = 150, 600"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    """Every cell of train.ipynb runs, with fewer training steps than a reader's run (the demo's test checks what
    training at full length gives)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "train.ipynb", as_version=4)
    (steps_cell,) = [c for c in nb.cells if c.cell_type == "code" and NOTEBOOK_STEPS in c.source]
    steps_cell.source = steps_cell.source.replace(NOTEBOOK_STEPS, "PRETRAIN_STEPS, SFT_STEPS = 60, 60")
    os.environ["CHATLM_NOTEBOOK_OUT"] = str(tmp_path / "nb")
    try:
        nbclient.NotebookClient(nb, timeout=SLOW_TIMEOUT - 120, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["CHATLM_NOTEBOOK_OUT"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve was drawn
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "ipywidgets" not in text and "IProgress" not in text  # no warning about live Jupyter bars
    seen, unseen = text.index("SEEN in training"), text.index("UNSEEN: held out")  # the chat, labelled
    assert seen < text.index("Assistant:", seen) < unseen < text.index("Assistant:", unseen)
    check_chat_ready(tmp_path / "nb" / "sft" / "latest", answers=False)


@pytest.mark.slow
def test_a_signal_during_the_demo_stops_every_later_stage(tmp_path):
    """SIGINT while the demo pretrains: the run saves, SFT never starts, nothing says "done", exit 130."""
    import signal
    import time
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "train.py", "demo", "--out", str(out), "--pretrain-steps", "100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "pretrain" / "train.log", time.time() + SLOW_TIMEOUT / 2
    while not (log.exists() and " step 50 " in log.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "done in" not in stdout
    assert (out / "pretrain" / "latest" / "training_state").is_dir() and not (out / "sft").exists()
