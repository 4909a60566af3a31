"""bench/gpu.py on the CPU: its reading of nvidia-smi samples (synthetic lines), its report, its reference models."""
from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu  # noqa: E402
from gpu import Measured, Report, clock_and_power  # noqa: E402


def stamp(epoch: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(epoch)) + f".{round(epoch % 1 * 1000):03d}"


def test_clock_and_power_takes_the_medians_of_this_gpus_samples_inside_the_window():
    t0 = time.mktime(time.strptime("2026/11/21 19:00:00", "%Y/%m/%d %H:%M:%S"))
    lines = ["timestamp, uuid, clocks.sm [MHz], power.draw [W]",  # a header, if one is printed
             f"{stamp(t0 + 0.9)}, GPU-aaa, 1980, 120.0",  # before the window
             f"{stamp(t0 + 1.1)}, GPU-aaa, 1545, 693.5",
             f"{stamp(t0 + 1.2)}, GPU-bbb, 1200, 300.0",  # another GPU
             f"{stamp(t0 + 1.3)}, GPU-aaa, 1500, [N/A]",  # no power reading: skipped
             f"{stamp(t0 + 1.4)}, GPU-aaa, 1560, 691.0",
             f"{stamp(t0 + 1.5)}, GPU-aaa, 1290, 700.0",
             f"{stamp(t0 + 2.5)}, GPU-aaa, 1800, 200.0",  # after it
             f"{stamp(t0 + 2.6)}, GPU-aa"]  # cut off while nvidia-smi was writing
    assert clock_and_power(lines, t0 + 1.0, t0 + 2.0, "aaa") == (1545.0, 693.5)
    assert clock_and_power(lines, t0 + 1.0, t0 + 2.0, "bbb") == (1200.0, 300.0)
    assert clock_and_power(lines, t0 + 3.0, t0 + 4.0, "aaa") is None


def test_energy_per_token_is_power_over_throughput():
    notes = Measured(tokens_per_s=14_000.0, peak_gib=14.512, sm_mhz=1545.4, watts=693.0).notes("ours")
    assert notes == {"ours_peak_gib": 14.512, "ours_sm_mhz": 1545, "ours_watts": 693, "ours_mj_per_token": 49.5}
    assert Measured(10.0, 1.0).notes("ref") == {"ref_peak_gib": 1.0}
    assert Measured(10.0, 1.0, host_gib=5.584).notes("ours") == {"ours_peak_gib": 1.0, "ours_host_gib": 5.58}


def test_every_row_records_the_library_versions_both_sides_ran_with(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)  # no nvidia-smi: the monitor samples nothing
    report = Report(tmp_path, "abc1234")
    report.add("pretrain_small_compiled", 537_175.0, 421_895.0, "tokens/s", ours_peak_gib=20.1)
    row = json.loads((tmp_path / "results.json").read_text())[0]
    torch_version = importlib.metadata.version("torch")
    assert row["versions"]["torch"] == torch_version and set(row["versions"]) == {"torch", "transformers", "peft",
                                                                                  "triton"}
    assert row["ratio"] == 1.273 and row["commit"] == "abc1234"
    header, _, table = (tmp_path / "results.md").read_text().partition("\n\n")
    assert header.startswith("NVIDIA H100 80GB HBM3, torch " + torch_version)
    assert "versions" not in table and "ours_peak_gib=20.1" in table


def test_the_unmasked_reference_calls_sdpa_causal_under_compile_with_the_same_loss(monkeypatch):
    """transformers <= 5.17 builds the causal mask while compiling (run 42); `hf_causal` must never pass one."""
    pytest.importorskip("transformers")
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    cfg = gpu.ModelConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=160, max_position_embeddings=64)
    batch = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    masked = gpu.build("hf", cfg, torch.float32, device="cpu")(input_ids=batch, labels=batch).loss
    calls.clear()
    unmasked = torch.compile(gpu.build("hf_causal", cfg, torch.float32, device="cpu"), backend="aot_eager")
    loss = unmasked(input_ids=batch, labels=batch).loss
    assert calls == [(True, True)] * cfg.num_hidden_layers
    torch.testing.assert_close(loss, masked, rtol=1e-5, atol=1e-6)
