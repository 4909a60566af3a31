"""GPU benchmark: ours against transformers / PEFT, side by side in one process on one GPU.

    python bench/gpu.py [--only pretrain_small lora_7b qlora_7b decode] [--out DIR] [--commit SHA]

Every figure: warm-up steps first, synchronized timing, the median of several steps, random (never zero) data.
Writes DIR/results.json (one object per figure: name, ours, reference, ratio, unit, device, commit, date) and
DIR/results.md (a table for bench/RESULTS.md); each figure is written as soon as it is measured.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402
from model.trainer import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402

VOCAB, GiB = 32000, 2**30
SMALL = ModelConfig.preset("small", vocab_size=VOCAB, max_position_embeddings=1024)
LLAMA_7B = ModelConfig(vocab_size=VOCAB, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


class Report:
    def __init__(self, out: Path, commit: str):
        self.out, self.rows = out, []
        self.device = torch.cuda.get_device_name()
        self.common = {"device": self.device, "commit": commit, "date": datetime.date.today().isoformat()}
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
                "name", "ours", "reference", "ratio", "unit", "device", "commit", "date"))
            lines.append(f"| {r['name']} | {r['ours']} | {r['reference']} | {r['ratio']} | {r['unit']} | {notes} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")


def median_seconds(step, warmup: int, iters: int) -> float:
    """Median wall time of `step` (synchronized before and after each run) after `warmup` runs."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hf_llama(cfg: ModelConfig):
    import transformers
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf_cfg)


def build(kind: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cuda"):
    """A random-init model of the shape, built directly on `device` in `dtype` (no copy)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(cfg) if kind == "ours" else hf_llama(cfg)
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
    results = {}
    for compiled in (False, True):
        for kind in ("ours", "hf"):
            free()
            model = build(kind, SMALL, torch.float32).train()
            fwd = torch.compile(model) if compiled else model
            step = train_step_fn(fwd, kind, batch, list(model.parameters()))
            t = median_seconds(step, warmup=3, iters=10)
            tok_s = batch_size * seq / t
            results[(kind, compiled)] = (tok_s, torch.cuda.max_memory_allocated() / GiB)
            del model, fwd, step
        (ours, ours_mem), (ref, ref_mem) = results[("ours", compiled)], results[("hf", compiled)]
        mode = "compiled" if compiled else "eager"
        report.add(f"pretrain_small_{mode}", ours, ref, "tokens/s", batch=f"{batch_size}x{seq}",
                   ours_mfu=None if peak is None else round(ours * fpt / peak, 3),
                   ref_mfu=None if peak is None else round(ref * fpt / peak, 3),
                   ours_peak_gib=round(ours_mem, 2), ref_peak_gib=round(ref_mem, 2))


# ---- 2./3. LoRA and QLoRA on a 7B shape ------------------------------------------------------------------------------
def quantize_blocks(model: Transformer) -> None:
    """Every decoder-block linear -> NF4 in place (what `load_model(..., tensor_hook=nf4_hook())` does on load)."""
    from model.nf4 import BLOCK_LINEARS, NF4Linear
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            parent, _, leaf = name.rpartition(".")
            if leaf in BLOCK_LINEARS and isinstance(module, torch.nn.Linear):
                setattr(layer.get_submodule(parent), leaf, NF4Linear.from_linear(module))


def lora_step(kind: str, r: int, targets, batch: torch.Tensor, qlora: bool = False,
              compiled: bool = False, keep: int = 0) -> tuple[float, float]:
    """Tokens/s and peak GiB of a LoRA step; `keep` = our last layers exempt from checkpointing (no recompute)."""
    free()
    model = build(kind, LLAMA_7B, torch.bfloat16)
    if kind == "ours":
        from model.lora import apply_lora
        if qlora:
            quantize_blocks(model)
            free()
        apply_lora(model, r=r, alpha=2 * r, dropout=0.05, targets=targets)
        model.gradient_checkpointing, model.no_recompute_last = True, keep
    else:
        import peft
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.cuda.reset_peak_memory_stats()
    forward = torch.compile(model) if compiled else model
    t = median_seconds(train_step_fn(forward, kind, batch, params), warmup=3 if compiled else 2, iters=5)
    mem = torch.cuda.max_memory_allocated() / GiB
    del model, params, forward
    return batch.shape[0] * (batch.shape[1] - 1) / t, mem


def lora_7b(report: Report, keep: int = 1) -> None:
    """q,v r=8: eager against eager, compiled against compiled, then ours compiled with the last `keep` layers not
    recomputed (as much as fits under the reference's eager peak) against the reference as usually run (eager)."""
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    name, r, targets = "lora_7b_qv_r8", 8, ["q_proj", "v_proj"]
    ours, ours_mem = lora_step("ours", r, targets, batch)
    ref, ref_mem = lora_step("hf", r, targets, batch)
    report.add(name, ours, ref, "tokens/s", batch="4x1024", checkpointing=True, ours_peak_gib=round(ours_mem, 2),
               ref_peak_gib=round(ref_mem, 2), reference_is="transformers+peft")
    report.bf16_lora = ours
    ours_c, ours_c_mem = lora_step("ours", r, targets, batch, compiled=True)
    ref_c, ref_c_mem = lora_step("hf", r, targets, batch, compiled=True)
    report.add(f"{name}_compiled", ours_c, ref_c, "tokens/s", batch="4x1024", checkpointing=True,
               ours_peak_gib=round(ours_c_mem, 2), ref_peak_gib=round(ref_c_mem, 2),
               reference_is="transformers+peft, torch.compile", ours_vs_reference_eager=round(ours_c / ref, 3))
    ours_k, ours_k_mem = lora_step("ours", r, targets, batch, compiled=True, keep=keep)
    report.add(f"{name}_compiled_keep{keep}", ours_k, ref, "tokens/s", batch="4x1024",
               checkpointing=f"all but the last {keep} layers", ours_peak_gib=round(ours_k_mem, 2),
               ref_peak_gib=round(ref_mem, 2), reference_is="transformers+peft (eager)",
               ours_vs_reference_compiled=round(ours_k / ref_c, 3))


def lora_7b_all_linear(report: Report) -> None:
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    ours, ours_mem = lora_step("ours", 16, "all-linear", batch)
    ref, ref_mem = lora_step("hf", 16, "all-linear", batch)
    report.add("lora_7b_all_linear_r16", ours, ref, "tokens/s", batch="4x1024", checkpointing=True,
               ours_peak_gib=round(ours_mem, 2), ref_peak_gib=round(ref_mem, 2), reference_is="transformers+peft")


def qlora_7b(report: Report) -> None:
    batch = torch.randint(0, VOCAB, (4, 1025), device="cuda")
    ours, mem = lora_step("ours", 8, ["q_proj", "v_proj"], batch, qlora=True)
    report.add("qlora_7b_qv_r8", ours, getattr(report, "bf16_lora", None), "tokens/s", batch="4x1024",
               checkpointing=True, ours_peak_gib=round(mem, 2), reference_is="our bf16 LoRA")


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
        return new_tokens / median_seconds(run, warmup=1, iters=3)


def decode(report: Report, new_tokens: int = 256, prompt_len: int = 64) -> None:
    for label, cfg in (("small", SMALL), ("7b", LLAMA_7B)):
        prompt = torch.randint(0, VOCAB, (1, prompt_len), device="cuda")
        speeds = {kind: decode_speed(kind, cfg, prompt, new_tokens) for kind in ("ours_eager", "ours_compiled", "hf")}
        report.add(f"decode_{label}", speeds["ours_compiled"], speeds["hf"], "tokens/s",
                   ours_eager=round(speeds["ours_eager"], 1), batch=1, prompt=prompt_len, new_tokens=new_tokens,
                   reference_is="transformers generate (sampling, KV cache)")


FIGURES = {"pretrain_small": pretrain_small, "lora_7b": lora_7b, "lora_7b_all_linear": lora_7b_all_linear,
           "qlora_7b": qlora_7b, "decode": decode}


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


if __name__ == "__main__":
    main()
