"""bench/stages.py on the CPU: what it reads back from a run of ours (train.log windows, padding), the data subset,
TRL's step clock, the CPU defaults; end to end (slow): sft_small and generate_batch, both sides, on a tiny model."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stages  # noqa: E402

LOG = """2026-12-07 10:00:00 batch: 65,536 tokens per step per process = 128 rows x 512 tokens x 1 micro-batch (budget)
2026-12-07 10:00:00 training 110,000,000 trainable parameters for 30 steps on 1 x cuda:0 (bf16)
2026-12-07 10:00:40 compiled: the first step took 38.5 s
2026-12-07 10:00:41 step 10 loss 9.1234 lr 2.00e-05 150,000 tok/s MFU 11.5% peak 20.10 GiB
2026-12-07 10:00:43 step 20 loss 8.1234 lr 4.00e-05 500,000 tok/s MFU 40.0% peak 20.25 GiB
2026-12-07 10:00:45 step 30 loss 7.1234 lr 6.00e-05 520,000 tok/s MFU 41.6% peak 20.25 GiB
2026-12-07 10:00:46 eval step 30: loss 7.0000 ppl 1096.6332
"""


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    if "accelerate" in sys.modules:
        stages.reset_accelerate()


def test_log_windows_after_the_first_give_our_rate_less_padding():
    windows = stages.parse_log(LOG)
    assert [(w.step, w.tokens_per_s, w.peak_gib) for w in windows] == [
        (10, 150_000, 20.10), (20, 500_000, 20.25), (30, 520_000, 20.25)]
    assert windows[1].mfu == pytest.approx(0.40)
    run = stages.OurRun(windows, {"rows": 128, "grad_accum": 1, "row_tokens": 512}, {"pad_fraction": 0.02}, 60.0,
                        "38.5 s (compiling)")
    assert run.positions_per_s == 510_000  # the median of the windows after the compiling one
    assert run.tokens_per_s == pytest.approx(510_000 * 0.98)
    assert run.peak_gib == 20.25
    notes = run.notes()
    assert notes["ours_windows_tokens_per_s"] == [150_000, 500_000, 520_000]
    assert notes["ours_logged_mfu"] == pytest.approx(0.408)


def test_a_cpu_log_line_and_a_single_window_count():
    windows = stages.parse_log("step 3 loss 10.3907 lr 6.00e-06 56 tok/s\n")
    assert [(w.step, w.tokens_per_s, w.mfu, w.peak_gib) for w in windows] == [(3, 56.0, None, None)]
    assert stages.steady(windows) == windows
    with pytest.raises(ValueError, match="no throughput window"):
        stages.steady([])


def test_subset_keeps_the_first_training_rows_in_order(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    rows = lambda lo, hi: pa.table({"prompt": [f"q{i}" for i in range(lo, hi)],  # noqa: E731
                                    "response": [f"a{i}" for i in range(lo, hi)]})
    pq.write_table(rows(0, 40), prepared / "train-00000.parquet")
    pq.write_table(rows(40, 80), prepared / "train-00001.parquet")
    pq.write_table(rows(100, 140), prepared / "valid-00000.parquet")
    out = stages.subset(prepared, tmp_path / "sft", 50)
    assert pq.read_table(out / "train-00000.parquet")["prompt"].to_pylist() == [f"q{i}" for i in range(50)]
    assert stages.rows_in(out, "valid") == 16  # a twentieth, at least 16
    assert stages.rows_in(stages.subset(prepared, tmp_path / "all", None), "train") == 80


def test_overrides_parse_as_python_values():
    assert stages.parse_overrides(["max_length=128", "bf16=False", "optim=adamw_torch", "x=None"]) == {
        "max_length": 128, "bf16": False, "optim": "adamw_torch", "x": None}
    with pytest.raises(SystemExit):
        stages.parse_overrides(["max_length"])


def test_step_clock_times_after_the_warmup_then_stops_the_run():
    pytest.importorskip("transformers")
    trainer = SimpleNamespace(_total_train_tokens=0)
    clock = stages.step_clock(trainer, warmup=2, seconds=0.0, cuda=False)
    state, control = SimpleNamespace(global_step=0, max_steps=100), SimpleNamespace(should_training_stop=False)
    for step in range(1, 5):
        state.global_step = step
        trainer._total_train_tokens += 1000
        clock.on_step_end(None, state, control)
        if control.should_training_stop:
            break
    assert clock.start[1:] == (2000, 2) and clock.end[1:] == (3000, 3)  # the clock starts at the warmup's end
    assert state.global_step == 3


def test_cpu_defaults_are_a_smoke_run():
    args = stages.parse_args(["--device", "cpu"])
    assert args.only == ["sft_small", "generate_batch"] and args.dpo_only == ["lora"]
    assert (args.sft_steps, args.lora_steps, args.ref_warmup, args.ref_max_steps, args.gen_iters) == (3, 2, 1, 3, 1)
    assert args.tokenizer == args.corpora / "tokenizers" / "llama"
    gpu = stages.parse_args(["--device", "cuda", "--only", "lora_7b_sft"])
    assert (gpu.sft_steps, gpu.lora_steps, gpu.ref_seconds, gpu.dpo_only) == (300, 30, 75.0, ["lora", "compiled"])


@pytest.mark.slow
def test_tiny_cpu_run_measures_both_sides(tmp_path, shared_corpora):
    pytest.importorskip("trl")
    rows = stages.main(["--device", "cpu", "--preset", "tiny", "--records", "200", "--corpora", str(shared_corpora),
                        "--ours", "max_seq_length=128", "batch_size=2",
                        "--trl", "max_length=128", "per_device_train_batch_size=2",
                        "--gen-prompts", "4", "--gen-tokens", "8", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), "--commit", "abc1234"])
    assert [r["name"] for r in rows] == ["sft_tiny", "generate_batch_tiny"]  # no *_failed row
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows
    sft, gen = rows
    assert sft["ours"] > 0 and sft["reference"] > 0 and sft["records"] == 200
    assert sft["ours_batch"]["row_tokens"] == 128 and 0 <= sft["ours_pad_fraction"] < 0.5
    assert sft["ref_settings"]["padding_free"] and sft["ref_settings"]["packing_strategy"] == "bfd"
    assert sft["ref_settings"]["completion_only_loss"] and sft["versions"]["trl"] != "absent"
    assert gen["ours"] > 0 and gen["reference"] > 0 and gen["prompts"] == 4 and gen["new_tokens"] == 8
