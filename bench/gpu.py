"""GPU benchmark: ours against transformers / PEFT, side by side in one process on one GPU.

    python bench/gpu.py [--only pretrain_small lora_7b qlora_7b decode] [--out DIR] [--commit SHA]

Every figure: warm-up steps first, synchronized timing, the median of several steps, random (never zero) data; for
the training steps also the SM clock and board power during the timed steps (nvidia-smi in the background) and the
energy per token. These GPUs run under a power cap, so a denser step runs at a lower clock.
Writes DIR/results.json (one object per figure: name, ours, reference, ratio, unit, device, commit, date) and
DIR/results.md (a table for bench/README.md); each figure is written as soon as it is measured.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402
from trainer.activations import OFFLOAD_SKIP_LAST, ActivationPolicy, apply_activation_policy, compiles_per_block  # noqa: E402,E501
from trainer.loop import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402

VOCAB, GiB = 32000, 2**30
SMALL = ModelConfig.preset("small", vocab_size=VOCAB, max_position_embeddings=1024)
LLAMA_7B = ModelConfig(vocab_size=VOCAB, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


class Report:
    def __init__(self, out: Path, commit: str):
        self.out, self.rows = out, []
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # cpu: smoke runs
        self.common = {"device": self.device, "commit": commit, "date": datetime.date.today().isoformat(),
                       "versions": library_versions()}
        self.monitor = GpuMonitor()
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, ours: float, reference: float | None, unit: str, **extra) -> None:
        ratio = None if not reference else ours / reference
        row = {"name": name, "ours": round(ours, 4), "reference": None if reference is None else round(reference, 4),
               "ratio": None if ratio is None else round(ratio, 3), "unit": unit, **self.common, **extra}
        self.rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=2, ensure_ascii=False) + "\n")
        lines = ["| figure | ours | reference | ratio | unit | notes |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in (
                "name", "ours", "reference", "ratio", "unit", "device", "commit", "date", "versions"))
            lines.append(f"| {r['name']} | {r['ours']} | {r['reference']} | {r['ratio']} | {r['unit']} | {notes} |")
        versions = ", ".join(f"{k} {v}" for k, v in self.common["versions"].items())
        (self.out / "results.md").write_text(f"{self.device}, {versions}\n\n" + "\n".join(lines) + "\n")


def library_versions() -> dict[str, str]:
    """The versions both sides ran with: the reference's speed moves with them (transformers 5.17 under
    torch.compile materializes the causal mask), so every row records them."""
    found = {}
    for name in ("torch", "transformers", "peft", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def median_seconds(step, warmup: int, iters: int) -> tuple[float, float, float]:
    """Median wall time of `step` (synchronized before and after each run) after `warmup` runs, and the epoch times
    at which the timed runs began and ended (to read GpuMonitor's samples of them)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times, began = [], time.time()
    for _ in range(iters):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), began, time.time()


def clock_and_power(lines: Iterable[str], start: float, end: float, uuid: str = "") -> tuple[float, float] | None:
    """Median SM clock (MHz) and board power (W) of the nvidia-smi samples
    (`timestamp, uuid, clocks.sm, power.draw` with nounits) taken between epoch times `start` and `end` on the GPU
    whose UUID contains `uuid`; None when there is none."""
    clocks, watts = [], []
    for line in lines:
        try:
            stamp, gpu, mhz, w = (part.strip() for part in line.split(","))
            day, _, fraction = stamp.partition(".")
            t = time.mktime(time.strptime(day, "%Y/%m/%d %H:%M:%S")) + float("0." + (fraction or "0"))
            sample = float(mhz), float(w)
        except ValueError:  # a header, a cut-off last line, or "[N/A]"
            continue
        if uuid in gpu and start <= t <= end:
            clocks.append(sample[0])
            watts.append(sample[1])
    return (statistics.median(clocks), statistics.median(watts)) if clocks else None


class GpuMonitor:
    """nvidia-smi sampling the SM clock and board power every 100 ms in the background, for the whole run. Power is
    the instantaneous reading where the driver has it: `power.draw` averages over 1 s on Ampere and newer, longer
    than a figure's timed steps can be, so it mixes in the idle time before them."""

    def __init__(self):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        self.proc, self.uuid = None, ""
        if shutil.which("nvidia-smi") is None:
            return
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.split()
        if len(gpus) > 1:  # ours among several: torch's UUID is nvidia-smi's without the "GPU-" prefix
            self.uuid = str(torch.cuda.get_device_properties().uuid)
        fields = subprocess.run(["nvidia-smi", "--help-query-gpu"], capture_output=True, text=True).stdout
        power = "power.draw.instant" if '"power.draw.instant"' in fields else "power.draw"
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu=timestamp,uuid,clocks.sm,{power}",
                                      "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=self.log, stderr=subprocess.DEVNULL)

    def during(self, start: float, end: float) -> tuple[float, float] | None:
        self.log.flush()
        return clock_and_power(Path(self.log.name).read_text().splitlines(), start, end, self.uuid)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        self.log.close()


@dataclass
class Measured:
    """One side of a training figure."""
    tokens_per_s: float
    peak_gib: float
    sm_mhz: float | None = None
    watts: float | None = None
    host_gib: float | None = None  # pinned host memory holding offloaded activations

    def notes(self, side: str) -> dict:
        """Report columns: peak memory, clock, power and energy per token (mJ) of `side` (ours / ref)."""
        notes = {f"{side}_peak_gib": round(self.peak_gib, 3)}  # 3 places: "no more memory" is a close call
        if self.host_gib is not None:
            notes[f"{side}_host_gib"] = round(self.host_gib, 2)
        if self.watts is not None:
            notes |= {f"{side}_sm_mhz": round(self.sm_mhz), f"{side}_watts": round(self.watts),
                      f"{side}_mj_per_token": round(1e3 * self.watts / self.tokens_per_s, 2)}
        return notes


def measure(report: Report, step, tokens: int, warmup: int, iters: int) -> Measured:
    """Tokens/s of `step`, its peak memory since the last reset, and the clock and power it ran at."""
    seconds, start, end = median_seconds(step, warmup, iters)
    conditions = report.monitor.during(start, end) or (None, None)
    return Measured(tokens / seconds, torch.cuda.max_memory_allocated() / GiB, *conditions)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def causal_sdpa() -> str:
    """Register and name a transformers attention that never builds a mask: SDPA with `is_causal=True` (each call
    registers again; the registries are dicts, so that is harmless).

    transformers <= 5.17 builds the full causal mask under `torch.compile` and calls SDPA with `is_causal=False`, which
    runs the masked kernel over the whole square; later versions skip the mask when they can. A
    mask function that returns None gives the reference that path on any version, through transformers' public
    attention registries; transformers' own SDPA forward then sets `is_causal` itself."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register("sdpa_causal", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_causal", lambda *args, **kwargs: None)
    return "sdpa_causal"


def hf_llama(cfg: ModelConfig, causal: bool = False):
    """transformers' Llama of the shape with SDPA attention; `causal`: with the mask never built (`causal_sdpa`)."""
    import transformers
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation=causal_sdpa() if causal else "sdpa")
    return transformers.LlamaForCausalLM(hf_cfg)


def build(kind: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cuda"):
    """A random-init model of the shape (`kind`: ours, hf or hf_causal), built directly on `device` in `dtype`."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(cfg) if kind == "ours" else hf_llama(cfg, causal=kind == "hf_causal")
    finally:
        torch.set_default_dtype(default)


def train_step_fn(model, kind: str, batch: torch.Tensor, params):
    """forward (bf16 autocast) + backward + fused AdamW; the same work for both sides."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if kind == "ours":
                loss = model(inputs, labels)
            else:  # transformers shifts internally: give it the unshifted row of the same length
                loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ---- 1. pretraining step of the small preset ----------------------------------------------------------------------
def pretrain_small(report: Report, batch_size: int = 32, seq: int = 1024) -> None:
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in report.device), None)
    with torch.device("meta"):
        fpt = flops_per_token(Transformer(SMALL), seq)
    batch = torch.randint(0, VOCAB, (batch_size, seq + 1), device="cuda")
    # eager, transformers already passes is_causal=True; compiled, it is measured as shipped and without its mask
    for compiled, refs in ((False, {"hf": "eager"}), (True, {"hf": "compiled", "hf_causal": "compiled_causal_ref"})):
        results = {}
        for kind in ("ours", *refs):
            free()
            model = build(kind, SMALL, torch.float32).train()
            fwd = torch.compile(model) if compiled else model
            step = train_step_fn(fwd, kind, batch, list(model.parameters()))
            results[kind] = measure(report, step, batch_size * seq, warmup=3, iters=10)
            del model, fwd, step
        ours = results["ours"]
        for kind, label in refs.items():
            ref = results[kind]
            report.add(f"pretrain_small_{label}", ours.tokens_per_s, ref.tokens_per_s, "tokens/s",
                       batch=f"{batch_size}x{seq}",
                       ours_mfu=None if peak is None else round(ours.tokens_per_s * fpt / peak, 3),
                       ref_mfu=None if peak is None else round(ref.tokens_per_s * fpt / peak, 3),
                       **ours.notes("ours"), **ref.notes("ref"))


# ---- 2./3. LoRA and QLoRA on a 7B shape ------------------------------------------------------------------------------
def quantize_blocks(model: Transformer) -> None:
    """Every decoder-block linear -> NF4 in place (what `load_model(..., tensor_hook=nf4_hook())` does on load)."""
    from model.nf4 import BLOCK_LINEARS, NF4Linear
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            parent, _, leaf = name.rpartition(".")
            if leaf in BLOCK_LINEARS and isinstance(module, torch.nn.Linear):
                setattr(layer.get_submodule(parent), leaf, NF4Linear.from_linear(module))


def lora_step(report: Report, kind: str, r: int, targets, batch: torch.Tensor, qlora: bool = False,
              compiled: bool = False, keep: int = 0, offload: int | None = None) -> Measured:
    """A LoRA step measured; `keep` = our last layers exempt from checkpointing (no recompute); `offload` = ours with
    activation offloading, the last `offload` recomputed layers not offloaded. Ours compiles a graph per block when
    offloading and for QLoRA, as the trainer does."""
    free()
    model = build(kind, LLAMA_7B, torch.bfloat16)
    if kind == "ours":
        from model.lora import apply_lora
        if qlora:
            quantize_blocks(model)
            free()
        apply_lora(model, r=r, alpha=2 * r, dropout=0.05, targets=targets)
    else:
        import peft
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.cuda.reset_peak_memory_stats()
    per_block = compiled and compiles_per_block(model, offload is not None)
    offloader = None
    if kind == "ours":  # as the trainer applies it
        offloader = apply_activation_policy(model, ActivationPolicy(
            checkpointing=True, offload=offload is not None, compile_blocks=per_block, keep_last=keep,
            offload_skip_last=offload))
    forward = torch.compile(model) if compiled and not per_block else model
    measured = measure(report, train_step_fn(forward, kind, batch, params), batch.shape[0] * (batch.shape[1] - 1),
                       warmup=3 if compiled else 2, iters=5)
    if offload is not None:
        measured.host_gib = offloader.offloaded_bytes / GiB
    del model, params, forward
    return measured


def lora_7b(report: Report, keep: int = 2) -> None:
    """q,v r=8: eager against eager, compiled against compiled (the reference without its mask, as in
    `pretrain_small`), then ours compiled with the last `keep` layers not recomputed against the reference as usually
    run (eager): 2 is as many as stay under the reference's eager peak memory. Last, ours compiled with activation
    offloading at the trainer's defaults (`--offload-activations`: 4 layers not offloaded)."""
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    name, r, targets = "lora_7b_qv_r8", 8, ["q_proj", "v_proj"]
    ours, ref = lora_step(report, "ours", r, targets, batch), lora_step(report, "hf", r, targets, batch)
    report.add(name, ours.tokens_per_s, ref.tokens_per_s, "tokens/s", batch="4x1024", checkpointing=True,
               **ours.notes("ours"), **ref.notes("ref"), reference_is="transformers+peft")
    ours_c = lora_step(report, "ours", r, targets, batch, compiled=True)
    ref_c = lora_step(report, "hf_causal", r, targets, batch, compiled=True)  # compiled at its best: no mask built
    report.add(f"{name}_compiled", ours_c.tokens_per_s, ref_c.tokens_per_s, "tokens/s", batch="4x1024",
               checkpointing=True, **ours_c.notes("ours"), **ref_c.notes("ref"),
               reference_is="transformers+peft, torch.compile, SDPA is_causal (no mask built)",
               ours_vs_reference_eager=round(ours_c.tokens_per_s / ref.tokens_per_s, 3))
    ours_k = lora_step(report, "ours", r, targets, batch, compiled=True, keep=keep)
    report.add(f"{name}_compiled_keep{keep}", ours_k.tokens_per_s, ref.tokens_per_s, "tokens/s", batch="4x1024",
               checkpointing=f"all but the last {keep} layers", **ours_k.notes("ours"), **ref.notes("ref"),
               reference_is="transformers+peft (eager)",
               ours_vs_reference_compiled=round(ours_k.tokens_per_s / ref_c.tokens_per_s, 3))
    ours_o = lora_step(report, "ours", r, targets, batch, compiled=True, offload=OFFLOAD_SKIP_LAST)
    report.add(f"{name}_compiled_offload", ours_o.tokens_per_s, ref.tokens_per_s, "tokens/s", batch="4x1024",
               checkpointing="recomputed layers save gate/up and offload to host memory, the last "
                             f"{OFFLOAD_SKIP_LAST} on the GPU", **ours_o.notes("ours"), **ref.notes("ref"),
               reference_is="transformers+peft (eager)",
               ours_vs_reference_compiled=round(ours_o.tokens_per_s / ref_c.tokens_per_s, 3))


def lora_7b_all_linear(report: Report) -> None:
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    ours, ref = lora_step(report, "ours", 16, "all-linear", batch), lora_step(report, "hf", 16, "all-linear", batch)
    report.add("lora_7b_all_linear_r16", ours.tokens_per_s, ref.tokens_per_s, "tokens/s", batch="4x1024",
               checkpointing=True, **ours.notes("ours"), **ref.notes("ref"), reference_is="transformers+peft")


def qlora_7b(report: Report) -> None:
    """QLoRA q,v r=8 against our bf16 LoRA of the same settings: both eager, then both compiled (QLoRA a graph per
    block, as the trainer compiles it)."""
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    for compiled in (False, True):
        ours = lora_step(report, "ours", 8, ["q_proj", "v_proj"], batch, qlora=True, compiled=compiled)
        bf16 = lora_step(report, "ours", 8, ["q_proj", "v_proj"], batch, compiled=compiled)
        report.add("qlora_7b_qv_r8" + ("_compiled" if compiled else ""), ours.tokens_per_s, bf16.tokens_per_s,
                   "tokens/s", batch="4x1024", checkpointing=True, **ours.notes("ours"), **bf16.notes("ref"),
                   reference_is="our bf16 LoRA" + (", compiled" if compiled else ""))


# ---- 4. decoding ----------------------------------------------------------------------------------------------------
def decode_speed(kind: str, cfg: ModelConfig, prompt: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of one batch-1 sampled generation of `new_tokens` (median of 3 after a warm-up)."""
    from model.generation import SamplingConfig, generate
    free()
    model = build("hf" if kind == "hf" else "ours", cfg, torch.bfloat16).eval()
    if kind == "hf":
        def run():
            out = model.generate(prompt, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            assert out.shape[1] == prompt.shape[1] + new_tokens
    else:
        config = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=new_tokens, stop_ids=(VOCAB + 1,), seed=0)
        ids = prompt[0].tolist()

        def run():
            out = generate(model, [ids], config, compile=kind == "ours_compiled")
            assert len(out[0]) == new_tokens
    with torch.inference_mode():
        return new_tokens / median_seconds(run, warmup=1, iters=3)[0]


def decode(report: Report, new_tokens: int = 256, prompt_len: int = 64) -> None:
    for label, cfg in (("small", SMALL), ("7b", LLAMA_7B)):
        prompt = torch.randint(0, VOCAB, (1, prompt_len), device="cuda")
        speeds = {kind: decode_speed(kind, cfg, prompt, new_tokens) for kind in ("ours_eager", "ours_compiled", "hf")}
        report.add(f"decode_{label}", speeds["ours_compiled"], speeds["hf"], "tokens/s",
                   ours_eager=round(speeds["ours_eager"], 1), batch=1, prompt=prompt_len, new_tokens=new_tokens,
                   reference_is="transformers generate (sampling, KV cache)")


# Decoding first: its eager and transformers figures are paced by the host, and read lower when measured after the
# compiled training steps in the same process.
FIGURES = {"decode": decode, "pretrain_small": pretrain_small, "lora_7b": lora_7b,
           "lora_7b_all_linear": lora_7b_all_linear, "qlora_7b": qlora_7b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(FIGURES), choices=list(FIGURES), help="figures to run")
    parser.add_argument("--out", default="bench", help="where results.json / results.md go")
    parser.add_argument("--commit", default="unknown", help="commit being measured")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(Path(args.out), args.commit)
    for name in args.only:
        start = time.perf_counter()
        try:
            FIGURES[name](report)
        except Exception:  # one failing figure must not lose the others
            traceback.print_exc()
            report.add(f"{name}_failed", 0.0, None, "error")
        print(f"# {name} took {time.perf_counter() - start:.0f} s", flush=True)
    report.monitor.close()


if __name__ == "__main__":
    main()
