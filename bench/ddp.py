"""DDP scaling of the real training loop: the `small` preset (seq 1024, bf16, compiled, fused AdamW) on random tokens,
run by model.trainer.Trainer under `accelerate launch` with 1 and then 2 processes; prints global tokens/s of each.

    python bench/ddp.py --gpus 2 [--steps 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
    def save(self, model, out_dir) -> None:
        pass

    def load(self, model, ckpt_dir) -> None:
        pass


def worker(args) -> None:
    from model import ModelConfig, Transformer
    from model.trainer import TrainConfig, Trainer, make_accelerator, set_seed_everywhere
    cfg = TrainConfig(out_dir=args.run, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=5,
                      mixed_precision="bf16", compile=True, log_every=10, save_total_limit=1)
    acc = make_accelerator(cfg)
    set_seed_everywhere(0)
    model = Transformer(ModelConfig.preset("small"))
    loader = RandomRows(args.batch_size, 1024, model.config.vocab_size, acc.process_index)
    Trainer(model, loader, cfg, NoWeights(), accelerator=acc).train()


def last_tokens_per_s(run: Path) -> float:
    speeds = re.findall(r" step \d+ .* ([\d,]+) tok/s", (run / "train.log").read_text())
    return float(speeds[-1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="bench")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # set for the launched workers
    args = parser.parse_args()
    if args.run:
        return worker(args)
    speeds = {}
    for n in (1, args.gpus):
        run = Path(args.out) / f"ddp-{n}"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
                  "--mixed_precision", "bf16", "--dynamo_backend", "no", *(["--multi_gpu"] if n > 1 else []),
                  __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--run", str(run)]
        subprocess.run(launch, check=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
        speeds[n] = last_tokens_per_s(run)
    result = {"name": "ddp_scaling", "ours": speeds[args.gpus], "reference": speeds[1],
              "ratio": round(speeds[args.gpus] / speeds[1], 3), "unit": "tokens/s (global)",
              "device": f"{args.gpus} x {torch.cuda.get_device_name()}", "batch_per_gpu": f"{args.batch_size}x1024"}
    print(json.dumps(result))
    (Path(args.out) / "ddp.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
