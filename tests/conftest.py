"""Shared fixtures. Real corpora live in ../shared/corpora beside the checkout; tests that read them skip with a
reason when that folder is absent (the repository never copies them)."""
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
SHARED_CORPORA = REPO.parent / "shared" / "corpora"
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def triton_interpreter() -> None:
    """Skips unless Triton kernels run on CPU tensors here, in Triton's interpreter (turned on above)."""
    pytest.importorskip("triton", reason="Triton (requirements-dev.txt) runs the GPU kernels' CPU tests")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a CUDA machine): the kernels' CUDA tests run instead")


@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    if not SHARED_CORPORA.is_dir():
        pytest.skip(f"real corpora samples not found at {SHARED_CORPORA} (../shared/corpora beside the checkout)")
    return SHARED_CORPORA


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
