"""Time to quality: the `small` preset (768 x 12) trained from scratch on a real Chinese corpus for the same training
time on one GPU, transformers against ours, held-out bits per character every `--eval-every` seconds (issue 31).

    python bench/quality.py --corpus ../shared/corpora/zh_books/zh_books_laws.parquet --work /tmp/quality \
        [--minutes 5] [--recipe best optimizer=muon schedule=wsd] [--sides reference ours best] --out DIR --commit SHA
    python bench/quality.py --merge DIR1/curves.json DIR2/curves.json --out DIR    # sides run in separate calls
    # a host with several GPUs: prepare once (`--sides` alone), then one side per GPU at the same time
    python bench/quality.py --corpus C --work W --sides
    CUDA_VISIBLE_DEVICES=0 python bench/quality.py --corpus C --work W --sides reference --out DIR/reference &
    CUDA_VISIBLE_DEVICES=1 python bench/quality.py --corpus C --work W --recipe best ... --sides best --out DIR/best &
    wait

Sides, each fed the same packed token stream (trainer/data.py `PackedLoader`, one seed) in the same order:
- `reference`: `transformers.LlamaForCausalLM` of the same shape, SDPA with `is_causal` and no mask built
  (bench/gpu.py `hf_llama(causal=True)`), `torch.compile`, bf16 autocast, fused AdamW lr 6e-4, betas 0.9 / 0.95,
  weight decay 0.1 on matrices, linear warmup then cosine to 10% (written out here, not the trainer's), gradient
  clipping at 1.0: the usual recipe (nanoGPT's);
- `ours`: our model with `train.py pretrain`'s defaults (PretrainConfig: optimizer, schedule, learning rate, warmup,
  clipping), compiled, bf16 autocast, through the trainer's `build_optimizer` / `set_learning_rate`;
- a recipe (`--recipe NAME KEY=VALUE ...`, repeatable; `best` the one this issue adopts): ours with those PretrainConfig
  overrides; `batch_size` (rows per step) and `seq_len` change its training batch, not the held-out set.
Batch shape (`--batch-size` x `--seq-len`) is otherwise the same for all sides. Training time is the time of the
optimizer steps (synchronized every `--sync-steps` steps); compiling (two untimed forward / backward passes before
the clock starts) and evaluation are not counted. The schedules' length follows the measured speed, so that the
decay ends with the budget. Held-out set: the first `--heldout-batches` batches of the prepared `valid` split (never
trained on; with the side's document masking, if any); bits per character = mean loss in nats / ln 2 / the split's
characters per token.

Writes DIR/curves.json (every side's curve and its settings), DIR/results.json and results.md (rows `quality_<side>`:
bits/char at the budget against the reference's, and `time_to_reference_loss_<side>`: the reference's seconds to its
final held-out loss over ours, linear between evaluations), and DIR/quality.png (the curves).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu import Report, build, free  # noqa: E402

from model import ModelConfig  # noqa: E402
from trainer.config import PretrainConfig  # noqa: E402
from trainer.data import pretrain_loader  # noqa: E402
from trainer.loop import build_optimizer, set_learning_rate  # noqa: E402
from trainer.stages import new_model  # noqa: E402
from utils.prepare import PrepareConfig, prepare_corpora  # noqa: E402
from utils.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SIDES = ("reference", "ours")  # and the recipes
REFERENCE = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=200, min_lr_ratio=0.1, grad_clip=1.0)


def prepare(corpus: Path, work: Path, vocab_size: int) -> tuple[Path, Path]:
    """The corpus prepared as plain text (train / valid / test) and a BPE tokenizer trained on its train split, under
    `work` (reused when already there)."""
    data, tok = work / "data", work / "tokenizer"
    if not (data / "stats.json").exists():
        prepare_corpora([("text", corpus)], data, PrepareConfig(split=(0.98, 0.01, 0.01), worker="process",
                                                                overwrite=True), progress=True)
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(data, vocab_size, tok, show_progress=True)
    return data, tok


TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> PretrainConfig overrides, each value parsed as its field's type (an optional field's
    too: `batch_size=64`, `compile=true`)."""
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        f = fields.get(key)
        kind = f and TYPES.get(str(f.type).split(" | ")[0])
        if not sep or kind is None or f.metadata.get("required"):
            raise SystemExit(f"--recipe {pair!r}: expected KEY=VALUE with KEY a PretrainConfig option that has a "
                             "default")
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return overrides


class Side:
    """One side's model, optimizer and schedule; `step` runs one optimizer step, `heldout` the held-out loss."""

    def __init__(self, name: str, cfg: ModelConfig, overrides: dict, device: str):
        self.name, self.hf = name, name == "reference"
        if self.hf:
            self.model = build("hf_causal", cfg, torch.float32, device).train()
            decay = [p for p in self.model.parameters() if p.ndim >= 2]
            rest = [p for p in self.model.parameters() if p.ndim < 2]
            self.optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": REFERENCE["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                lr=REFERENCE["lr"], betas=REFERENCE["betas"], fused=device == "cuda")
            self.settings = dict(REFERENCE)
        else:
            self.train_cfg = PretrainConfig(data="-", tokenizer="-", **overrides)
            torch.manual_seed(0)
            with torch.device(device):
                self.model = new_model(cfg, self.train_cfg).train()
            self.model.z_loss = self.train_cfg.z_loss
            self.optimizer = build_optimizer(self.model, self.train_cfg, torch.device(device))
            self.settings = {f.name: getattr(self.train_cfg, f.name) for f in dataclasses.fields(PretrainConfig)
                             if f.name in ("optimizer", "schedule", "lr", "min_lr_ratio", "warmup_steps", "decay_ratio",
                                           "weight_decay", "beta1", "beta2", "grad_clip", "document_masking")
                             or f.name in overrides}
        self.forward = torch.compile(self.model) if device == "cuda" else self.model
        self.clip = self.settings["grad_clip"]
        self.device, self.total, self.steps = device, 1, 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, y = batch["input_ids"].to(self.device, non_blocking=True), batch["labels"].to(self.device, non_blocking=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            if self.hf:  # the targets as given (transformers would otherwise shift them again)
                return self.forward(input_ids=x, labels=y, shift_labels=y).loss
            return self.forward(x, y)

    def learning_rate(self) -> None:
        if self.hf:
            r = REFERENCE
            if self.steps < r["warmup_steps"]:
                scale = (self.steps + 1) / r["warmup_steps"]
            else:
                progress = min(1.0, (self.steps - r["warmup_steps"]) / max(1, self.total - r["warmup_steps"]))
                scale = r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in self.optimizer.param_groups:
                group["lr"] = r["lr"] * scale
        else:
            set_learning_rate(self.optimizer, self.steps, self.total, self.train_cfg)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.learning_rate()
        self.loss(batch).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def warm_up(self, batch: dict[str, torch.Tensor]) -> None:
        """Compile the forward and backward graphs without changing a weight."""
        for _ in range(2):
            self.loss(batch).backward()
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def heldout(self, batches: list[dict[str, torch.Tensor]]) -> float:
        self.model.eval()
        loss = sum(self.loss(b).float() for b in batches) / len(batches)
        self.model.train()
        return loss.item()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_side(side: Side, stream, heldout: list, bits_per_nat_char: float, budget_s: float, eval_every_s: float,
               sync_steps: int) -> list[dict]:
    """Train `side` for `budget_s` seconds of optimizer steps; the curve of (seconds, steps, held-out bits/char)."""
    side.warm_up(next(stream))
    curve = [{"seconds": 0.0, "steps": 0, "bits_per_char": side.heldout(heldout) * bits_per_nat_char}]
    clock, next_eval = 0.0, eval_every_s
    while clock < budget_s:
        synchronize(side.device)
        start = time.perf_counter()
        for _ in range(sync_steps):
            side.step(next(stream))
        synchronize(side.device)
        clock += time.perf_counter() - start
        side.total = max(side.steps + 1, round(budget_s / clock * side.steps))  # the decay ends with the budget
        if clock >= next_eval or clock >= budget_s:
            curve.append({"seconds": round(clock, 2), "steps": side.steps,
                          "bits_per_char": round(side.heldout(heldout) * bits_per_nat_char, 5)})
            print(f"# {side.name}: {clock:6.1f} s, step {side.steps}, held-out {curve[-1]['bits_per_char']:.4f} "
                  "bits/char", flush=True)
            next_eval += eval_every_s
    return curve


def seconds_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at which `curve` first reaches `target` bits/char (linear between evaluations)."""
    for a, b in zip(curve, curve[1:]):
        if b["bits_per_char"] <= target:
            if a["bits_per_char"] <= target:
                return a["seconds"]
            t = (a["bits_per_char"] - target) / (a["bits_per_char"] - b["bits_per_char"])
            return a["seconds"] + t * (b["seconds"] - a["seconds"])
    return None


def write_report(runs: dict, out: Path, commit: str) -> None:
    """Rows against the reference and the plot, from `runs` ({side: {"curve": [...], ...}})."""
    report = Report(out, commit)
    ref = runs.get("reference")
    for name, run in runs.items():
        final = run["curve"][-1]
        common = dict(minutes=run["minutes"], steps=final["steps"], batch=run["batch"], settings=run["settings"],
                      corpus=run["corpus"], tokens_per_s=round(run["tokens_per_s"]))
        report.add(f"quality_{name}", final["bits_per_char"], ref and ref["curve"][-1]["bits_per_char"],
                   "held-out bits/char (lower is better)", **common)
        if ref is not None and name != "reference":
            seconds = seconds_to(run["curve"], ref["curve"][-1]["bits_per_char"])
            ref_seconds = ref["curve"][-1]["seconds"]
            report.add(f"time_to_reference_loss_{name}", ref_seconds / seconds if seconds else 0.0, 1.0,
                       "x reference speed", seconds=seconds and round(seconds, 1), reference_seconds=ref_seconds,
                       reached=seconds is not None, **common)
    report.monitor.close()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        curve = run["curve"][1:]  # the untrained point would flatten the scale
        ax.plot([p["seconds"] for p in curve], [p["bits_per_char"] for p in curve], marker=".", label=name)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out bits per character")
    ax.set_title(f"small preset, {next(iter(runs.values()))['corpus']}, {report.device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="a text corpus for `train.py prepare --format text`")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality"), help="prepared data and tokenizer")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--recipe", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="a side of ours named NAME with these PretrainConfig overrides (repeatable)")
    parser.add_argument("--sides", nargs="*", help="the sides to train, one after another (default: reference, ours "
                                                   "and every recipe); none: only prepare the data and tokenizer")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per side")
    parser.add_argument("--eval-every", type=float, default=20.0, help="seconds of training between evaluations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heldout-batches", type=int, default=16)
    parser.add_argument("--sync-steps", type=int, default=10, help="steps between clock reads")
    parser.add_argument("--preset", default="small", help="model shape (`tiny` for a CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="curves.json files to report together")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs = {}
        for path in args.merge:
            runs |= json.loads(path.read_text(encoding="utf-8"))
        write_report(runs, args.out, args.commit)
        return
    if args.corpus is None:
        parser.error("--corpus is required (or --merge)")
    recipes = {name: parse_overrides(pairs) for name, *pairs in args.recipe}
    if clash := set(recipes) & set(SIDES):
        parser.error(f"--recipe {' '.join(clash)}: that name is a side of its own")
    sides = list(SIDES) + list(recipes) if args.sides is None else args.sides
    if unknown := [name for name in sides if name not in SIDES and name not in recipes]:
        parser.error(f"--sides {' '.join(unknown)}: not reference, ours or a --recipe name")
    torch.backends.cuda.matmul.allow_tf32 = True
    data, tok_dir = prepare(args.corpus, args.work, args.vocab_size)
    if not sides:  # `--sides` alone: prepare once, before sides run in parallel on a host's GPUs
        print(f"prepared {data} and {tok_dir}")
        return
    tokenizer = Tokenizer.load(tok_dir)
    runs = {}
    for name in sides:
        free()
        overrides = recipes.get(name, {})
        rows, seq_len = overrides.get("batch_size") or args.batch_size, overrides.get("seq_len", args.seq_len)
        cfg = ModelConfig.preset(args.preset, vocab_size=tokenizer.vocab_size,
                                 max_position_embeddings=max(seq_len, args.seq_len))
        side = Side(name, cfg, overrides, args.device)
        masking = side.settings.get("document_masking", False)  # then trained and measured with its segments
        valid = pretrain_loader(data, tokenizer, "valid", args.seq_len, args.batch_size, seed=0,
                                document_masking=masking)
        stream = iter(pretrain_loader(data, tokenizer, "train", seq_len, rows, seed=0, document_masking=masking))
        heldout = list(itertools.islice(valid, args.heldout_batches))
        bits_per_nat_char = 1 / math.log(2) / valid.chars_per_token
        curve = train_side(side, stream, heldout, bits_per_nat_char, args.minutes * 60, args.eval_every,
                           args.sync_steps)
        runs[name] = dict(curve=curve, settings=side.settings, minutes=args.minutes, corpus=args.corpus.name,
                          batch=f"{rows}x{seq_len}", tokens_per_s=side.steps * rows * seq_len / curve[-1]["seconds"])
        (args.out / "curves.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
        del side, stream, valid
    write_report(runs, args.out, args.commit)


if __name__ == "__main__":
    main()
