"""bench/dpo.py on the CPU, tiny shape: ours and TRL's DPOTrainer + PEFT both run a training step end to end (every
LoRA B moves, the first loss is log 2), and the rows say what each side ran."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import dpo as bench_dpo  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_accelerate():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_both_sides_get_the_same_pairs_of_nonzero_tokens():
    setup = bench_dpo.Setup("tiny", bench_dpo.TINY, torch.device("cpu"), pairs=2, prompt=16, answer=16, warmup=0,
                            iters=1)
    batch = bench_dpo.our_batch(setup)
    assert batch["input_ids"].shape == (2, 2 * setup.seq)  # a pair to a row, its two sequences side by side
    assert sorted(batch["pair_ids"].tolist()) == [0, 1]
    for row, pair in zip(batch["input_ids"].tolist(), batch["pair_ids"].tolist()):
        prompt, chosen, rejected = setup.triples[pair]
        assert 0 not in prompt + chosen + rejected
        assert row[:2 * setup.seq - 2] == (prompt + chosen)[:-1] + (prompt + rejected)[:-1]


def test_tiny_cpu_run_trains_both_sides_and_reports_them(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    rows = bench_dpo.main(["--shape", "tiny", "--device", "cpu", "--only", "lora", "qlora", "--warmup", "0",
                           "--iters", "1", "--out", str(tmp_path), "--commit", "abc1234"])
    assert [r["name"] for r in rows] == ["dpo_tiny_lora_qv_r8", "dpo_tiny_qlora_qv_r8"]  # no *_failed row
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    lora, qlora = rows
    assert lora["unit"] == "pairs/s" and lora["ours"] > 0 and lora["reference"] > 0
    for key in ("ours_first_loss", "ref_first_loss"):  # at step 0 the policy is its reference
        assert lora[key] == pytest.approx(math.log(2), abs=1e-4)
    assert "TRL" in lora["reference_is"] and "DPOTrainer" in lora["reference_is"]
    assert "base_reference" in lora["ours_is"] and lora["versions"]["trl"] != "absent"
    assert qlora["reference"] == lora["ours"] and "NF4" in qlora["ours_is"]  # measured once, shared
