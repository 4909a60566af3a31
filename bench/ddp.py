"""Multi-GPU scaling of the real training loop (trainer.loop.Trainer under `accelerate launch`, random tokens), run with
1 and then N processes; prints and writes the global tokens/s of each and the peak GPU memory per process.

    python bench/ddp.py --gpus 2 [--steps 100] [--out DIR]                # `small` preset, compiled, DDP
    python bench/ddp.py --gpus 2 --model lora7b --steps 12 [--out DIR]    # LoRA r=8 q,v on the Llama-7B shape, FSDP2
    python bench/ddp.py --gpus 2 --model lora7b-offload --steps 12        # the same under DDP, compiled, offloading

DDP variants: --bucket-mb N (gradient bucket size), --copy-gradients (gradients copied out of the buckets instead
of being views of them, DDP's default), --dynamo-ddp MODE
(torch._dynamo.config.optimize_ddp: ddp_optimizer splits the compiled graph at each bucket so its all-reduce overlaps
the backward, no_optimization keeps one graph, python_reducer traces the all-reduce with compiled autograd).

small: seq 1024, bf16, compiled, fused AdamW, 16 rows per GPU. lora7b: bf16 base, gradient checkpointing, 4 x 1024
per GPU; the N-process run shards it with accelerate_fsdp.yaml (the 1-process run is the plain model).
lora7b-offload: the same LoRA under DDP (each GPU holds the whole base) with --compile --offload-activations, which
FSDP does not take.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from trainer.config import TrainConfig  # noqa: E402
from trainer.loop import DDP_BUCKET_MB  # noqa: E402


class RandomRows:
    """Random token rows (never zeros), different per rank; trivially resumable."""

    batches_per_epoch = 10**9

    def __init__(self, batch_size: int, seq: int, vocab: int, rank: int):
        self.shape, self.vocab = (batch_size, seq + 1), vocab
        self.generator = torch.Generator().manual_seed(rank)

    def __iter__(self):
        while True:
            rows = torch.randint(0, self.vocab, self.shape, generator=self.generator)
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoWeights:
    def save(self, model, out_dir, state=None) -> None:
        pass

    def load(self, model, ckpt_dir) -> None:
        pass


def worker(args) -> None:
    from model import ModelConfig, Transformer
    from trainer.loop import Trainer, make_accelerator, set_seed_everywhere, weights_device
    lora, offload = args.model.startswith("lora7b"), args.model == "lora7b-offload"
    cfg = TrainConfig(out_dir=args.run, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=5,
                      mixed_precision="bf16", compile=not lora or offload, gradient_checkpointing=lora,
                      offload_activations=offload, log_every=4 if lora else 10, save_total_limit=1)
    torch._dynamo.config.optimize_ddp = args.dynamo_ddp
    torch._dynamo.config.compiled_autograd = args.dynamo_ddp == "python_reducer"  # which needs it
    acc = make_accelerator(cfg, bucket_mb=args.bucket_mb)
    if args.copy_gradients:
        acc.ddp_handler.gradient_as_bucket_view = False
    set_seed_everywhere(0)
    if lora:
        from gpu import LLAMA_7B, build

        from model.lora import apply_lora
        # built on the GPU (a random init of 6.7B weights on the CPU takes minutes), then placed where `train.py lora`
        # loads it: on the CPU under FSDP. The setup peak counts from there.
        model = build("ours", LLAMA_7B, torch.bfloat16).to(weights_device(acc))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        apply_lora(model, r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
    else:
        model = Transformer(ModelConfig.preset("small"))
    loader = RandomRows(args.batch_size, 1024, model.config.vocab_size, acc.process_index)
    trainer = Trainer(model, loader, cfg, NoWeights(), accelerator=acc)
    setup_peak = torch.cuda.max_memory_allocated() / 2**30  # building / loading and sharding
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30
    (Path(args.run) / f"peak-gib-rank{acc.process_index}.txt").write_text(f"{peak:.2f} {setup_peak:.2f}\n")


def tokens_per_s(run: Path) -> float:
    """The median of the logged windows' tokens/s, the first (compilation, warm-up) left out."""
    speeds = re.findall(r" step \d+ .* ([\d,]+) tok/s", (run / "train.log").read_text())
    return statistics.median(float(s.replace(",", "")) for s in speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="small", choices=["small", "lora7b", "lora7b-offload"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per GPU (default 16 small, 4 lora7b)")
    parser.add_argument("--bucket-mb", type=int, default=DDP_BUCKET_MB,
                        help="DDP gradient bucket size (the trainer's DDP_BUCKET_MB)")
    parser.add_argument("--copy-gradients", action="store_true",
                        help="DDP gradient_as_bucket_view=False (the trainer uses True)")
    parser.add_argument("--dynamo-ddp", default="ddp_optimizer",
                        choices=["ddp_optimizer", "no_optimization", "python_reducer"])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # set for the launched workers
    args = parser.parse_args()
    args.batch_size = args.batch_size or (4 if args.model.startswith("lora7b") else 16)
    if args.run:
        return worker(args)
    speeds, peaks = {}, {}
    for n in (1, args.gpus):
        run = Path(args.out) / f"{args.model}-{n}"
        topology = []
        if n > 1:
            topology = ["--config_file", str(REPO / "accelerate_fsdp.yaml")] if args.model == "lora7b" else \
                ["--multi_gpu"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", *topology, "--num_processes", str(n),
                  "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", __file__,
                  "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--bucket-mb", str(args.bucket_mb), "--dynamo-ddp", args.dynamo_ddp,
                  *(["--copy-gradients"] if args.copy_gradients else []),
                  "--run", str(run)]
        subprocess.run(launch, check=True, cwd=REPO,
                       env=os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])})
        speeds[n] = tokens_per_s(run)
        per_rank = [[float(v) for v in f.read_text().split()] for f in run.glob("peak-gib-rank*.txt")]
        peaks[n] = {"train": max(r[0] for r in per_rank), "setup": max(r[1] for r in per_rank)}
    name = {"small": "ddp_scaling", "lora7b": "fsdp_lora_7b", "lora7b-offload": "ddp_lora_7b_offload"}[args.model]
    result = {"name": name, "ours": speeds[args.gpus], "reference": speeds[1],
              "ratio": round(speeds[args.gpus] / speeds[1], 3), "unit": "tokens/s (global)",
              "device": f"{args.gpus} x {torch.cuda.get_device_name()}", "batch_per_gpu": f"{args.batch_size}x1024",
              "peak_gib_per_gpu": peaks[args.gpus]["train"], "peak_gib_one_gpu": peaks[1]["train"],
              "setup_peak_gib_per_gpu": peaks[args.gpus]["setup"], "setup_peak_gib_one_gpu": peaks[1]["setup"],
              "bucket_mb": args.bucket_mb, "gradient_as_bucket_view": not args.copy_gradients,
              "dynamo_ddp": args.dynamo_ddp}
    print(json.dumps(result))
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
