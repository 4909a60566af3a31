"""Sharded training under `accelerate launch --config_file accelerate_fsdp.yaml` (FSDP2) on two GPUs: a resumed run
equals an uninterrupted one, two sharded processes equal one process with twice the accumulation, checkpoints are
whole (a model dir transformers loads, an optimizer state keyed by parameter name with full shapes), and LoRA trains
and saves a PEFT adapter. Skipped without two CUDA GPUs: CI has none, run it on a 2-GPU machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import _reset_accelerate, corpus, pretrain_args, weights  # noqa: F401 (fixtures)

import train
from model import load_model
from model.lora import load_adapter

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (FSDP across processes)")


def gpu_args(*args) -> list[str]:
    """The CPU tests' arguments on the GPU: full precision, so sharded and unsharded runs compare tightly."""
    return [a for a in args if a != "--cpu"]


def launch(*args: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_fsdp.yaml"),
               "--num_processes", "2", "--main_process_port", "29531", str(REPO / "train.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # CUDA's embedding backward adds with atomics: equal up to float rounding, not bitwise
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("fsdp") / "straight"
    launch(*gpu_args(*pretrain_args(corpus, run, "--max-steps", "6", "--save-every", "3")))
    return run


def test_resumed_sharded_run_equals_uninterrupted_and_checkpoints_are_whole(corpus, straight, tmp_path):  # noqa: F811
    run = tmp_path / "resumed"
    launch(*gpu_args(*pretrain_args(corpus, run, "--max-steps", "3")))
    launch(*gpu_args(*pretrain_args(corpus, run, "--max-steps", "6", "--resume")))
    assert "resumed from" in (run / "train.log").read_text()
    assert_same_weights(weights(straight), weights(run))

    latest = straight / "latest"
    params = dict(load_model(latest).named_parameters())
    optimizer = torch.load(latest / "training_state" / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(params)  # parameter names, every one (no shard left out)
    for name, state in optimizer["state"].items():
        assert state["exp_avg"].shape == params[name].shape, name
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(latest).eval()
    ids = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - load_model(latest)(ids)).abs().max() < 1e-4


def test_two_sharded_processes_equal_one_process_with_double_accumulation(corpus, tmp_path):  # noqa: F811
    launch(*gpu_args(*pretrain_args(corpus, tmp_path / "fsdp", "--max-steps", "3", "--batch-size", "2")))
    train.main(gpu_args(*pretrain_args(corpus, tmp_path / "one", "--max-steps", "3", "--batch-size", "2",
                                       "--grad-accum", "2")))
    assert_same_weights(weights(tmp_path / "fsdp"), weights(tmp_path / "one"))


def test_lora_under_fsdp_saves_a_trained_adapter_and_resumes(straight, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"第{i}个问题：北京是哪个国家的首都？", "input": "",
                                 "output": f"北京是中华人民共和国的首都。（{i}）"} for i in range(32)],
                               ensure_ascii=False), encoding="utf-8")
    common = ["lora", "--base", str(straight / "latest"), "--data", str(data), "--template", "chatml", "--r", "4",
              "--alpha", "8", "--max-seq-length", "64", "--batch-size", "2", "--warmup-steps", "1", "--lr", "1e-2",
              "--log-every", "1", "--mixed-precision", "no", "--dtype", "float32"]
    launch(*common, "--max-steps", "4", "--out", str(tmp_path / "a"))
    launch(*common, "--max-steps", "2", "--out", str(tmp_path / "b"))
    launch(*common, "--max-steps", "4", "--resume", "--out", str(tmp_path / "b"))
    a = load_file(tmp_path / "a" / "latest" / "adapter_model.safetensors")
    assert_same_weights(a, load_file(tmp_path / "b" / "latest" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # B starts at zero: it trained
    model = load_model(straight / "latest")
    load_adapter(model, tmp_path / "a" / "latest")
    assert model(torch.randint(0, 600, (1, 8))).isfinite().all()
