"""bench/quality.py on the CPU: the time-to-loss reading, the recipe overrides, and a timed run of both kinds of side
on a tiny model (the GPU run itself is the benchmark)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402
from conftest import SAMPLES  # noqa: E402

from model import ModelConfig  # noqa: E402
from utils.prepare import PrepareConfig, prepare_corpora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_seconds_to_interpolates_between_evaluations_and_says_never():
    curve = [{"seconds": 0, "bits_per_char": 9.0}, {"seconds": 20, "bits_per_char": 5.0},
             {"seconds": 40, "bits_per_char": 3.0}, {"seconds": 60, "bits_per_char": 3.5}]
    assert quality.seconds_to(curve, 4.0) == pytest.approx(30.0)
    assert quality.seconds_to(curve, 5.0) == pytest.approx(20.0)
    assert quality.seconds_to(curve, 2.9) is None


def test_recipe_overrides_take_each_options_type_and_refuse_unknown_keys():
    assert quality.parse_overrides(["optimizer=muon", "lr=0.002", "warmup_steps=50", "compile=true",
                                    "batch_size=64", "seq_len=2048"]) == {
        "optimizer": "muon", "lr": 0.002, "warmup_steps": 50, "compile": True, "batch_size": 64, "seq_len": 2048}
    for bad in (["nope=1"], ["lr"], ["data=x"]):  # data has no default: not a recipe knob
        with pytest.raises(SystemExit, match="KEY=VALUE"):
            quality.parse_overrides(bad)


def batches(vocab: int, seed: int):
    """Rows that count up from a random start: the next token is learnable within a few steps."""
    g = torch.Generator().manual_seed(seed)
    while True:
        row = (torch.randint(0, vocab - 1, (2, 1), generator=g) + torch.arange(33)) % (vocab - 1) + 1
        yield {"input_ids": row[:, :-1].contiguous(), "labels": row[:, 1:].contiguous()}


@pytest.mark.parametrize("name", ["reference", "best"])
def test_a_side_trains_for_its_budget_and_its_held_out_loss_falls(name, monkeypatch):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64, max_position_embeddings=32)
    short = {"warmup_steps": 2, "lr": 3e-3}  # a few steps must learn something
    for key, value in short.items():
        monkeypatch.setitem(quality.REFERENCE, key, value)
    overrides = short | {"optimizer": "muon", "schedule": "wsd", "untie_embeddings": True,
                         "zero_init_residual": True} if name == "best" else {}
    side = quality.Side(name, cfg, overrides, "cpu")
    if name == "best":  # the model-shaping levers reach the side's model
        assert not side.model.config.tie_word_embeddings and not side.model.model.layers[0].mlp.down_proj.weight.any()
    heldout = [next(batches(64, 1))]
    curve = quality.train_side(side, batches(64, 0), heldout, 1 / math.log(2), budget_s=1.5, eval_every_s=0.5,
                               sync_steps=2)
    assert curve[0]["steps"] == 0 and curve[-1]["seconds"] >= 1.5 and curve[-1]["steps"] == side.steps
    assert side.steps < side.total <= side.steps + 2  # the schedule ended with the budget
    assert curve[-1]["bits_per_char"] < curve[0]["bits_per_char"]  # learned to count
    assert side.settings["lr"] == 3e-3 and side.settings.get("optimizer", "muon") == "muon"


def test_report_rows_and_plot(tmp_path):
    def run(points):
        return dict(curve=[{"seconds": s, "steps": 10 * s, "bits_per_char": b} for s, b in points], settings={},
                    minutes=1.0, corpus="synthetic", batch="2x32", tokens_per_s=100.0)
    runs = {"reference": run([(0, 9.0), (30, 5.0), (60, 4.0)]), "ours": run([(0, 9.0), (30, 4.0), (60, 3.5)])}
    quality.write_report(runs, tmp_path, "test")
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert rows["quality_ours"]["ours"] == 3.5 and rows["quality_ours"]["reference"] == 4.0
    assert rows["time_to_reference_loss_ours"]["seconds"] == 30.0
    assert rows["time_to_reference_loss_ours"]["ratio"] == 2.0 and rows["time_to_reference_loss_ours"]["reached"]
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_sides_alone_only_prepares_the_corpus_and_tokenizer(tmp_path):
    """`--sides` with no side: the data and tokenizer a multi-GPU run's parallel sides then share, and no curve."""
    work, out = tmp_path / "work", tmp_path / "out"
    quality.main(["--corpus", str(SAMPLES / "text" / "sanguo_yanyi_01.txt"), "--work", str(work), "--vocab-size",
                  "400", "--sides", "--out", str(out)])
    assert json.loads((work / "data" / "stats.json").read_text())["splits"]["train"] > 0
    assert (work / "tokenizer" / "tokenizer.json").exists() and not (out / "curves.json").exists()


def test_recipes_are_sides_of_their_own_with_their_batch_shape(tmp_path, capsys):
    """Two recipes of ours trained one after the other on a CPU: each its own curve, settings and batch (rows x row
    length from the recipe, else the run's), rows against the reference; an unknown side or a recipe named after a
    side is refused."""
    work, out = tmp_path / "work", tmp_path / "out"
    # prepared here with a valid split big enough for a held-out batch; the bench then reuses it
    prepare_corpora([("text", SAMPLES / "text")], work / "data", PrepareConfig(split=(0.6, 0.4, 0.0)))
    common = ["--corpus", str(SAMPLES / "text"), "--work", str(work), "--vocab-size", "400",
              "--preset", "tiny", "--device", "cpu", "--minutes", "0.01", "--eval-every", "0.3", "--batch-size", "2",
              "--seq-len", "32", "--heldout-batches", "1", "--sync-steps", "1", "--out", str(out)]
    quality.main(common + ["--recipe", "muon", "optimizer=muon", "warmup_steps=2",
                           "--recipe", "wide", "batch_size=4", "seq_len=64", "--sides", "ours", "muon", "wide"])
    runs = json.loads((out / "curves.json").read_text())
    assert list(runs) == ["ours", "muon", "wide"]
    assert runs["muon"]["settings"]["optimizer"] == "muon" and runs["ours"]["settings"]["optimizer"] == "adamw"
    assert [runs[n]["batch"] for n in runs] == ["2x32", "2x32", "4x64"]
    assert all(r["curve"][-1]["steps"] > 0 and r["curve"][-1]["seconds"] >= 0.6 for r in runs.values())
    for argv, message in ((["--sides", "nope"], "not reference, ours or a --recipe"),
                          (["--recipe", "ours", "lr=1e-3"], "a side of its own")):
        with pytest.raises(SystemExit):
            quality.main(common + argv)
        assert message in capsys.readouterr().err
