"""Shared fixtures. Real corpora, tokenizers and benchmark files live in ../shared beside the project's own checkout
(the repository never copies them); the tests that read them are extra checks that skip, saying so, in a clone
without that folder. torch gets one thread per free core (utils/threads.py), in this process and in the commands that
tests start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.threads import use_free_cores

if not torch.cuda.is_available():
    # Triton kernels (model/loss_kernel.py) then run in Triton's interpreter, on CPU tensors. It is read when
    # @triton.jit runs, so it is set before anything imports triton (torch alone does not).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two threads on two cores that other work shares run a tiny model's step many times slower than one thread.
TORCH_THREADS = use_free_cores()

REPO = Path(__file__).resolve().parents[1]
# One slow test, its fixtures included, may take this long (the demo on a 2-core machine other work shares); a fast
# test has pytest.ini's --timeout. Subprocesses that a slow test starts give up a little earlier, with their output.
SLOW_TIMEOUT = 1800
SHARED = REPO.parent / "shared"
SAMPLES = REPO / "data" / "samples"
# How a test that needs ../shared skips (the terminal summary counts them by it).
SHARED_SKIP = "optional check on the project's own data, which a clone does not have"


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Skips unless Triton kernels run on CPU tensors here, in Triton's interpreter (turned on above)."""
    pytest.importorskip("triton", reason="Triton (requirements-dev.txt) runs the GPU kernels' CPU tests")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a CUDA machine): the kernels' CUDA tests run instead")


def shared_dir(rel: str, what: str) -> Path:
    """The folder ../shared/`rel` beside the checkout; skips the test, saying what it needs, when absent."""
    path = SHARED / rel
    if not path.is_dir():
        pytest.skip(f"{SHARED_SKIP}: needs {what} in ../shared/{rel}")
    return path


@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    return shared_dir("corpora", "real corpora samples")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """`python train.py demo` at half its steps (these tests check the pipeline and the chat, not the answers), run
    once a session: (its output directory, what it printed). The demo's tests and DPO on the demo model share it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    run = subprocess.run([sys.executable, "train.py", "demo", "--out", str(out), "--pretrain-steps", "150",
                          "--sft-steps", "300"], cwd=REPO, capture_output=True, text=True, timeout=SLOW_TIMEOUT - 120)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory) -> Path:
    """A random `tiny` model of ours with 2048 positions and a 600-token tokenizer trained on the bundled alpaca sample
    beside it: a base for LoRA runs on the samples (what `train.py demo` makes, in seconds)."""
    from model import ModelConfig, Transformer, save_model
    from utils.tokenizer import Tokenizer, train_tokenizer
    root = tmp_path_factory.mktemp("tiny-base")
    train_tokenizer(SAMPLES / "alpaca" / "alpaca_zh_sample.json", 600, root / "tokenizer")
    tokenizer = Tokenizer.load(root / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=2048,
                                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                           bos_token_id=tokenizer.bos_id))
    return save_model(model, root / "base", tokenizer=tokenizer)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny
    models run fastest on one, whatever the session's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def pytest_report_header(config) -> str:
    return (f"torch threads: {torch.get_num_threads()} (cores free to this process; OMP_NUM_THREADS overrides)"
            + ("" if SHARED.is_dir() else f"; no {SHARED}: the tests that need it skip"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    shared = sum(1 for report in terminalreporter.stats.get("skipped", []) if SHARED_SKIP in str(report.longrepr))
    if shared:
        terminalreporter.write_line(f"{shared} skipped: optional checks on the project's own corpora and tokenizers "
                                    "(../shared beside its checkout), which a clone does not have")
    deselected = sum(1 for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow"))
    if deselected and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(f"{deselected} slow tests not run (the demo, the notebook, torchrun, "
                                    "torch.compile): python -m pytest -m slow")
