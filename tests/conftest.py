"""Shared fixtures. Real corpora, tokenizers and benchmark files live in ../shared beside the checkout; tests that
read them skip with a reason when their folder is absent (the repository never copies them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (model/loss_kernel.py) then run in Triton's interpreter, on CPU tensors. It is read when
    # @triton.jit runs, so it is set before anything imports triton (torch alone does not).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# One slow test, its fixtures included, may take this long (the demo on a 2-core machine other work shares); a fast
# test has pytest.ini's --timeout. Subprocesses that a slow test starts give up a little earlier, with their output.
SLOW_TIMEOUT = 1800
SHARED = REPO.parent / "shared"
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Skips unless Triton kernels run on CPU tensors here, in Triton's interpreter (turned on above)."""
    pytest.importorskip("triton", reason="Triton (requirements-dev.txt) runs the GPU kernels' CPU tests")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a CUDA machine): the kernels' CUDA tests run instead")


def shared_dir(rel: str, what: str) -> Path:
    """The folder ../shared/`rel` beside the checkout; skips the test, saying where `what` belongs, when absent."""
    path = SHARED / rel
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path}: put ../shared/{rel} beside the checkout to run this test")
    return path


@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    return shared_dir("corpora", "real corpora samples")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny
    models run fastest on one, and a busy machine's cores are not free for more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    deselected = sum(1 for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow"))
    if deselected and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(f"{deselected} slow tests not run (the demo, the notebook, torchrun, "
                                    "torch.compile): python -m pytest -m slow")
