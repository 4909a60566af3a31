"""The training loop shared by pretraining, SFT, LoRA and DPO.

One `accelerate.Accelerator` handles devices, mixed precision, gradient accumulation and DDP / FSDP (from an
accelerate config file). The loop itself is plain: a resumable batch iterator, AdamW with weight decay on matrices
only (or Muon for the decoder blocks' matrices), warmup + cosine (constant, or warmup-stable-decay) learning rate,
gradient clipping, periodic evaluation, atomic checkpoints with rotation and a `latest` pointer, exact resume, and a
clean stop on SIGINT / SIGTERM or a non-finite loss. The host reads each step's loss one step behind the GPU (no
device sync per step), so a stop lands one step after its cause. `build_optimizer` and `set_learning_rate` are
public: a loop of one's own (bench/quality.py) gets the same optimizer and schedule from a TrainConfig.
What a step minimizes is an `Objective`: language modelling (the mean cross-entropy over labelled tokens) unless a
stage gives another (DPO's, trainer/dpo.py), whose statistics are logged beside the loss.

Checkpoints are whole whatever the topology: under FSDP the weights and the optimizer state are gathered to rank 0
(torch.distributed.checkpoint's full state dicts, keyed by parameter name), so a run saved on 8 sharded GPUs is an
ordinary model dir, and its optimizer state resumes under DDP, FSDP or one process alike. Only the per-rank RNG and
data-cursor states tie an exact resume to the same number of processes.

A run directory:
    checkpoint-STEP/          model dir (or adapter dir) + training_state/
    latest -> checkpoint-STEP symlink, replaced atomically
    train.log                 plain-text log; tensorboard/ holds the scalars
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import errno
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from model.loss import IGNORE_INDEX
from model.nf4 import NF4Linear
from model.transformer import Transformer
from utils.errors import TrainingStopped
from utils.io import atomic_dir, write_json

from .activations import PAYS_FROM_WIDTH, ActivationPolicy, apply_activation_policy, compiles_per_block
from .batching import BatchPlan, can_probe, choose_batch, optimizer_state_bytes, probe_memory, saved_plan
from .config import TrainConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; an unknown device reports no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
STATE_DIR = "training_state"
DDP_BUCKET_MB = 100  # each gradient bucket's all-reduce overlaps the rest of the backward; larger buckets, fewer splits


class BatchLoader(Protocol):
    """What the loop needs from a data loader (trainer/data.py provides pretraining and SFT loaders)."""

    batches_per_epoch: int

    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Objective(Protocol):
    """What the loop minimizes: a mean over each batch's units, with statistics logged beside it."""

    unit: str  # what the units are, in words
    stat_names: tuple[str, ...]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """The batch's units, counted on the host (its tensors are still on the CPU: no device sync)."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the mean loss over the batch's units, its statistics summed over them [len(stat_names)], detached)."""

    def eval_metrics(self, loss: float, stats: list[float]) -> dict[str, float]:
        """An evaluation's metrics from its mean loss and mean statistics."""


@dataclass
class LanguageModeling:
    """Mean cross-entropy over the labelled tokens (pretraining, SFT, LoRA); evaluation adds perplexity and, given
    the split's characters per token, bits per character."""

    chars_per_token: float | None = None
    unit = "labelled tokens"
    stat_names = ()

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        loss = model(batch["input_ids"], batch["labels"], **rest)
        return loss, torch.zeros(0, device=loss.device)

    def eval_metrics(self, loss: float, stats: list[float]) -> dict[str, float]:
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50))}
        if self.chars_per_token:
            metrics["bits_per_char"] = loss / math.log(2) / self.chars_per_token
        return metrics


class WeightsIO(Protocol):
    """How a checkpoint stores the trainable weights: a full model dir, or a LoRA adapter dir. `state`, when given,
    holds the full (gathered) tensors to write instead of the model's own, which FSDP keeps sharded."""

    def save(self, model: nn.Module, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None: ...
    def load(self, model: nn.Module, ckpt_dir: Path) -> None: ...


class NonFiniteLoss(ValueError):
    """The loss or the weights stopped being finite: the run stops without saving them."""


class DamagedCheckpoint(ValueError):
    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}: the checkpoint is damaged; resume from an earlier one (--resume PATH, or "
                         f"--resume-fallback)")


def lr_multiplier(step: int, total: int, cfg: TrainConfig) -> float:
    """The schedule at 0-based `step` of `total`, as a fraction of the peak lr: linear warmup over cfg.warmup_steps,
    then cosine down to cfg.min_lr_ratio at `total`, constant 1, or wsd (warmup-stable-decay): 1 until the last
    cfg.decay_ratio of the steps, then linear down to cfg.min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    cosine = cfg.schedule == "cosine"
    start = cfg.warmup_steps if cosine else max(cfg.warmup_steps, total - round(cfg.decay_ratio * total))
    progress = min(1.0, max(0.0, (step - start) / max(1, total - start)))
    fall = 0.5 * (1 + math.cos(math.pi * progress)) if cosine else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * fall


def shortfalls(cfg: TrainConfig, total_steps: int) -> list[str]:
    """What the settings quietly leave short in a run of `total_steps` steps, a line each, said before the first
    step: a warmup that takes more than half the run (the lr spends the run climbing, and never reaches its peak
    when the warmup is the longer), and a fine-tune (cfg.min_steps_to_learn) with too few steps to learn anything."""
    notes = []
    more = "--max-steps" if cfg.max_steps else "--epochs"
    if cfg.warmup_steps * 2 > total_steps:
        shorter = f"use --warmup-steps {max(1, total_steps // 10)} (about a tenth of the run) or more {more}"
        if cfg.warmup_steps >= total_steps:
            peak = lr_multiplier(total_steps - 1, total_steps, cfg)
            notes.append(f"warning: --warmup-steps {cfg.warmup_steps} is longer than the run's {total_steps} steps: "
                         f"the learning rate climbs to {peak:.0%} of its peak (--lr {cfg.lr:g}) and never reaches "
                         f"it; {shorter}")
        else:
            notes.append(f"warning: --warmup-steps {cfg.warmup_steps} takes {cfg.warmup_steps / total_steps:.0%} of "
                         f"the run's {total_steps} steps: the learning rate spends most of the run below its peak "
                         f"(--lr {cfg.lr:g}); {shorter}")
    least = getattr(cfg, "min_steps_to_learn", 0)
    if total_steps < least:
        notes.append(f"warning: only {total_steps} optimizer steps: a fine-tune needs about {least} or more to learn "
                     f"the chat format (each step moves a weight by about --lr, so fewer leave answers empty or "
                     f"repeated punctuation); raise {more}, or lower --batch-size for more steps per epoch")
    return notes


def precision_in_words(mixed_precision: str, model: nn.Module) -> str:
    """How the steps compute: "bf16 mixed precision", or without it the weights' dtype ("float32")."""
    if mixed_precision != "no":
        return f"{mixed_precision} mixed precision"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def log_console(quiet: bool) -> Console:
    """The trainer's console, on stderr. Written to a file or a pipe, its lines are 160 wide, not rich's 80 (which
    cut the progress line's loss and times short)."""
    console = Console(stderr=True, quiet=quiet)
    if not (console.is_terminal or console.is_jupyter or "COLUMNS" in os.environ):
        console.width = 160
    return console


def draws_live(console: Console) -> bool:
    """Whether rich can draw a live progress bar on `console`: in Jupyter only with ipywidgets (without them it
    warns, 'install "ipywidgets" for Jupyter support', and draws nothing: the log lines say the same)."""
    return not console.is_jupyter or importlib.util.find_spec("ipywidgets") is not None


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, total: int, cfg: TrainConfig) -> float:
    """Set every param group's lr for 0-based `step` of `total`: cfg.lr x the schedule (lr_multiplier) x the group's
    own "lr_scale" (1 unless set: Muon's and AdamW's groups may differ). Returns cfg.lr x the schedule, for the log.
    The Trainer calls it before each step; so can a loop of one's own, with build_optimizer's optimizer."""
    lr = cfg.lr * lr_multiplier(step, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer, so that accelerate wraps it (no step while
    gradients accumulate, fp16 unscaling) and clipping, the schedule and checkpoints see one list of param_groups,
    Muon's first. Its state dict has torch's layout over both, so DCP keys it by parameter name as it does AdamW's.
    Like accelerate's own wrapper it skips Optimizer.__init__: the two optimizers hold the groups and the state."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for part in self.parts for k, v in part.state.items()}

    def step(self, closure=None):
        loss = self.parts[0].step(closure)
        self.parts[1].step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        state, groups = {}, []
        for part in self.parts:  # each part numbers its parameters from 0: shift them past the earlier part's
            offset, saved = sum(len(g["params"]) for g in groups), part.state_dict()
            state |= {i + offset: s for i, s in saved["state"].items()}
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in saved["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        for part in self.parts:
            mine, groups = groups[:len(part.param_groups)], groups[len(part.param_groups):]
            ids = {i for g in mine for i in g["params"]}
            part.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in ids},
                                  "param_groups": mine})


BLOCK_PARAMETER = re.compile(r"(^|\.)layers\.\d+\.")  # a decoder block's (model.layers.N.self_attn.q_proj.weight)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters. cfg.optimizer "adamw": AdamW (fused on CUDA), weight decay on
    matrices only (not norms, biases). "muon": torch.optim.Muon over the decoder blocks' matrices (attention and MLP
    weights), its update scaled to AdamW's RMS (adjust_lr_fn="match_rms_adamw") so that cfg.lr and cfg.weight_decay
    carry over, and AdamW as above over the rest (embeddings, lm_head, norms, biases): one MuonWithAdamW. Meant for
    whole models (TrainConfig refuses it for LoRA stages). Drive its lr with set_learning_rate."""
    muon = cfg.optimizer == "muon"
    if muon and "adjust_lr_fn" not in inspect.signature(getattr(torch.optim, "Muon", lambda: None)).parameters:
        raise ValueError(f"--optimizer muon needs torch.optim.Muon with adjust_lr_fn (torch 2.9 or later); this is "
                         f"torch {torch.__version__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = {id(p): p for n, p in named if muon and p.ndim == 2 and BLOCK_PARAMETER.search(n)}
    rest = [p for n, p in named if id(p) not in hidden]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if not muon:
        return adamw
    return MuonWithAdamW(torch.optim.Muon([{"params": list(hidden.values()), "lr_scale": 1.0}], lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """6N + 12 L H Q T (PaLM appendix B). N counts the weights of every matmul a token goes through (linears,
    LoRA adapters, NF4 bases, the lm_head even when tied), not the embedding lookup."""
    c = model.config
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (nn.Linear, NF4Linear)))
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    if device.type != "cuda" or mixed_precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def resolve_mixed_precision(choice: str, cpu: bool) -> str:
    if choice != "auto":
        return choice
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_compile(choice: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile, or auto (None): on for CUDA, where it pays, off on the CPU (the demo and the tests
    stay eager)."""
    return device.type == "cuda" if choice is None else choice


def make_accelerator(cfg: TrainConfig, bucket_mb: int = DDP_BUCKET_MB) -> Accelerator:
    """Built before the data so loaders know their rank; the accelerate config / launcher decides the topology."""
    # Buffers (the rotary table, QLoRA's frozen 4-bit bases) are identical on every rank: no per-step broadcast.
    # Gradients live in the all-reduce buckets: no copy in and out of them each step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, bucket_cap_mb=bucket_mb,
                                        gradient_as_bucket_view=True)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=cfg.grad_accum or 1,
                              cpu=cfg.cpu, log_with="tensorboard", project_dir=cfg.out_dir, kwargs_handlers=[ddp],
                              fsdp_plugin=fsdp_plugin(mixed_precision))
    check_fsdp_launch(accelerator)
    return accelerator


def check_fsdp_launch(accelerator: Accelerator) -> None:
    """An FSDP launch config (`accelerate launch --config_file accelerate_fsdp.yaml` sets ACCELERATE_USE_FSDP) with
    --cpu: accelerate shards on GPUs only and would quietly run DDP, every process holding the whole model; refused,
    before any work. (One GPU process has nothing to shard across, and several GPUs are sharded.)"""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.device.type == "cpu":
        mode = "DDP" if accelerator.num_processes > 1 else "one process"
        raise ValueError(f"the launch config asks for FSDP (ACCELERATE_USE_FSDP=true), but accelerate does not shard "
                         f"on the CPU: this would run as {mode}, each process holding the whole model. FSDP needs "
                         f"GPUs (leave out --cpu); on the CPU launch with accelerate.yaml (DDP)")


@dataclass
class StepRecord:
    """What the host needs from a step once the GPU has finished it."""

    step: int
    lr: float
    tokens: int  # per rank
    seq_len: int
    summary: torch.Tensor  # [global mean loss, stop votes, global mean statistics...], readable after `ready` fired
    ready: torch.cuda.Event | None
    # the host clock when the record was made: a CPU step has finished by then (its kernels ran on the host)
    made: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def end(self) -> float | torch.cuda.Event:
        """When the step ended: its event on a GPU, else the host clock when it was made."""
        return self.made if self.ready is None else self.ready


def to_host(summary: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a small device tensor into pinned host memory; read it after `event.synchronize()`. The event
    also times the step's end on the GPU's clock (`seconds_between`)."""
    if summary.device.type != "cuda":
        return summary, None
    host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True).copy_(summary, non_blocking=True)
    ready = torch.cuda.Event(enable_timing=True)
    ready.record()
    return host, ready


def window_start(device: torch.device) -> float | torch.cuda.Event:
    """A throughput window's start: an event on the GPU's stream for CUDA devices, else the host clock."""
    if device.type != "cuda":
        return time.perf_counter()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    return start


def seconds_between(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    """Seconds from a window's start to the end of a step (StepRecord.end), never to when the host reads it. On a GPU
    both are events on its timeline: the host reads each step one step late, at a moment that depends on where the
    next step made it wait, so its clock would put the last window of a run (no next step) short by up to a step
    (+23% tokens/s in a LoRA 7B run's last line). On the CPU both are host clock readings taken as steps end; timed
    from when the host read the window's last step instead, a step that saves, evaluates or ends the run, read just
    after the step before it, made a one-step window of microseconds (1,349,254,684 tokens/s in a run's last line)."""
    if isinstance(end, float):
        return max(end - start, 1e-9)
    return start.elapsed_time(end) / 1e3


def weights_device(accelerator: Accelerator, quantized: bool = False) -> torch.device:
    """Where to load a model's weights before `prepare`. Under FSDP: the CPU (a safetensors load there is zero-copy),
    because `fully_shard` moves one decoder layer at a time to the GPU and shards it, so no GPU ever holds the whole
    model. NF4 bases are quantized while loading, which is a GPU job, so they go to the accelerator's device."""
    if accelerator.distributed_type == DistributedType.FSDP and not quantized:
        return torch.device("cpu")
    return accelerator.device


def fsdp_plugin(mixed_precision: str) -> FullyShardedDataParallelPlugin | None:
    """Under an FSDP launch config with bf16 / fp16: compute in half precision, but reduce gradients and return the
    loss in fp32 (accelerate's default reduces and returns in half precision, as DDP here does not). The other
    settings come from the config file, as accelerate's own plugin would read them."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or mixed_precision not in ("bf16", "fp16"):
        return None
    half = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    third = "output_dtype" if os.environ.get("FSDP_VERSION", "1") == "2" else "buffer_dtype"
    return FullyShardedDataParallelPlugin(mixed_precision_policy={
        "param_dtype": half, "reduce_dtype": torch.float32, third: torch.float32})


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def point_latest(run_dir: Path, target: Path) -> None:
    """Replace the `latest` symlink atomically (symlink to a temp name, then rename over)."""
    tmp = run_dir / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.name)
    os.replace(tmp, run_dir / "latest")


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` is the one `latest` points at, or when that one is gone the newest
    complete checkpoint left (said in a warning); None when the run has none (a fresh start)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_DIR).is_dir():
            raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_DIR}/ inside)")
        return path.resolve()
    latest = run_dir / "latest"
    if (latest / STATE_DIR).is_dir():
        return latest.resolve()
    complete = [p for p in checkpoint_dirs(run_dir) if (p / STATE_DIR / "trainer_state.json").is_file()]
    if complete and (latest.is_symlink() or latest.exists()):
        print(f"warning: {latest} points at a missing checkpoint; resuming from the newest complete one, "
              f"{complete[-1]}", file=sys.stderr)
    return complete[-1].resolve() if complete else None


@contextlib.contextmanager
def disk_full_said(target: Path):
    """torch.save on a full disk fails with "unexpected pos N vs M" (its zip writer's check), safetensors with a bare
    I/O error: either way the user reads "no space left on device" and the checkpoint's path."""
    try:
        yield
    except (RuntimeError, SafetensorError) as e:
        if "unexpected pos" not in str(e) and "No space left" not in str(e):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from e


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A new run (no --resume) never writes over another run's checkpoints unless told to (--overwrite)."""
    if resume or overwrite:
        return
    found = checkpoint_dirs(run_dir)
    if found:
        raise ValueError(f"{run_dir} already holds checkpoints ({found[-1].name}); continue that run with --resume, "
                         f"start over in it with --overwrite, or give another --out")


def read_training_state(ckpt: Path) -> dict:
    """trainer_state.json of a checkpoint; a missing or broken one names the file and says the checkpoint is
    damaged."""
    path = ckpt / STATE_DIR / "trainer_state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(path, f"cannot be read ({e})") from None


def load_tensor_file(path: Path, **kwargs) -> Any:
    """torch.load(weights_only=True) of a checkpoint file; a truncated or missing one names the file."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DamagedCheckpoint(path, f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                ) from None


def check_checkpoint(ckpt: Path, world_size: int) -> None:
    """Every file a resume reads is there and whole (a torch.save file ends with the zip directory a truncated one
    lacks), before any of it is used."""
    meta = read_training_state(ckpt)
    if meta.get("world_size") != world_size:
        raise ValueError(f"{ckpt}: saved with {meta.get('world_size')} processes, resuming with {world_size}; exact "
                         f"resume needs the same number")
    for name in ["optimizer.pt", *(f"rank{r}.pt" for r in range(world_size))]:
        path = ckpt / STATE_DIR / name
        if not zipfile.is_zipfile(path):
            raise DamagedCheckpoint(path, "missing or truncated")


def earlier_checkpoint(run_dir: Path, before: Path) -> Path | None:
    """The newest complete checkpoint of the run older than `before` (for --resume-fallback)."""
    step = int(before.name.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", before.name) else None
    older = [p for p in checkpoint_dirs(run_dir) if step is None or int(p.name.split("-")[1]) < step]
    return older[-1] if older else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
             "numpy_pos": np.random.get_state()[2], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop ------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model: Transformer, train_loader: BatchLoader, cfg: TrainConfig, weights_io: WeightsIO,
                 eval_loader: Callable[[int, int], Iterable[dict]] | None = None, objective: Objective | None = None,
                 sample_fn: Callable[[nn.Module], list[tuple[str, str]]] | None = None,
                 knowledge_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 accelerator: Accelerator | None = None, run_info: dict | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out_dir)
        self.mixed_precision = resolve_mixed_precision(cfg.mixed_precision, cfg.cpu)
        self.accelerator = accelerator or make_accelerator(cfg)
        self.peak_flops = peak_flops(self.accelerator.device, self.mixed_precision)  # for MFU; None when unknown
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("DeepSpeed is not supported: for sharded training launch with an FSDP config "
                             "(accelerate_fsdp.yaml); DDP (accelerate.yaml) or one process otherwise")
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        if self.sharded and cfg.optimizer == "muon":
            raise ValueError("--optimizer muon is for one process or DDP: under FSDP torch.optim.Muon sees sharded "
                             "matrices (its updates differ from the whole matrices'); use --optimizer adamw")
        self.console = log_console(quiet=not self.accelerator.is_main_process)
        self.raw_model = model  # the module whose parameters train (DDP / FSDP / compile wrap this same object)
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.objective = objective or LanguageModeling()
        self.sample_fn = None if self.sharded else sample_fn  # one rank cannot generate from sharded weights
        self.knowledge_fn = None if self.sharded else knowledge_fn  # nor score benchmarks
        self.weights_io = weights_io
        self.run_info = run_info or {}
        self.step = 0
        self._stop_signal: int | None = None
        self._last_batch: dict[str, torch.Tensor] | None = None  # checked again before a save
        check_run_dir(self.run_dir, cfg.resume, cfg.overwrite)
        self.resume_from = self._load_resumed_weights(model, resolve_resume(self.run_dir, cfg.resume))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trainable = model.num_parameters(trainable_only=True)

        if self.sharded and cfg.offload_activations:
            raise ValueError("offload_activations is for one process or DDP: under FSDP the gathered weights that a "
                             "layer saves could not be told from its activations")
        model.train()
        optimizer = build_optimizer(model, cfg, self.accelerator.device)
        self.prepared, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model = self.prepared
        self.compiled = resolve_compile(cfg.compile, self.accelerator.device)
        per_block = self.compiled and compiles_per_block(model, cfg.offload_activations)
        policy = ActivationPolicy(checkpointing=cfg.gradient_checkpointing, offload=cfg.offload_activations,
                                  compile_blocks=per_block)
        apply_activation_policy(model, dataclasses.replace(policy, compile_blocks=False))  # a probe runs eagerly
        # evaluation covers --eval-batches batches of the starting rows, in the plan's micro-batches: the same rows
        # whatever the plan, so evaluations of runs on other devices compare
        self.eval_rows = cfg.eval_batches * cfg.start_rows
        self.batch_plan = self._plan_batch(cfg)
        self.log(self.batch_plan.describe(self.accelerator.num_processes))
        # the loop, the checkpoints' config and the accelerator follow the plan
        self.cfg = cfg = dataclasses.replace(cfg, batch_size=self.batch_plan.rows,
                                             grad_accum=self.batch_plan.grad_accum)
        self.accelerator.gradient_accumulation_steps = cfg.grad_accum
        if hasattr(train_loader, "batch_size"):
            train_loader.batch_size = cfg.batch_size
        apply_activation_policy(model, policy)
        if self.compiled and not per_block:  # after the DDP wrap: dynamo sees the buckets and overlaps their all-reduce
            self.model = torch.compile(self.prepared)
        steps_per_epoch = max(1, train_loader.batches_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    def _plan_batch(self, cfg: TrainConfig) -> BatchPlan:
        """Rows per micro-batch and accumulation (trainer/batching.py): a resumed run's saved plan, the flags, or on a
        GPU a probe of this step's memory."""
        loader, acc = self.train_loader, self.accelerator
        row_tokens = getattr(loader, "row_tokens", 0)  # 0: a loader of its own that does not say
        epoch_rows = getattr(loader, "rows_per_epoch", None)
        probe = None
        if can_probe(acc.device) and hasattr(loader, "probe_batch") and (epoch_rows or 2) // acc.num_processes > 1:
            def probe():
                return probe_memory(self._probe_step, acc.device, optimizer_state_bytes(self.raw_model))
        saved = saved_plan(read_training_state(self.resume_from)) if self.resume_from is not None else None
        return choose_batch(cfg, row_tokens, epoch_rows, acc.num_processes, probe, saved,
                            stage=self.run_info.get("command", "the stage"))

    def _probe_step(self, rows: int) -> None:
        """One forward and backward of the training data's first `rows` rows (the loader's position stays), for the
        batch plan's memory probe: no update, the gradients dropped."""
        batch = {k: v.to(self.accelerator.device) for k, v in self.train_loader.probe_batch(rows).items()}
        with self.accelerator.autocast():
            loss, _ = self.objective(self.prepared, batch)
        loss.backward()
        for p in self.raw_model.parameters():
            p.grad = None

    def _load_resumed_weights(self, model: nn.Module, ckpt: Path | None) -> Path | None:
        """The checkpoint's weights into the whole model (before FSDP shards it), its other files checked; with
        --resume-fallback a damaged checkpoint gives way to the newest earlier one."""
        while ckpt is not None:
            try:
                check_checkpoint(ckpt, self.accelerator.num_processes)
                try:
                    self.weights_io.load(model, ckpt)
                except (OSError, SafetensorError) as e:
                    raise DamagedCheckpoint(ckpt, f"its weights cannot be read ({e})") from None
                return ckpt
            except DamagedCheckpoint as e:
                earlier = earlier_checkpoint(self.run_dir, ckpt) if self.cfg.resume_fallback else None
                if earlier is None:
                    raise
                self.accelerator.print(f"warning: {e}\nwarning: falling back to {earlier}")
                ckpt = earlier.resolve()
        return None

    # -- logging
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoint-STEP atomically, point `latest` at it, then rotate old ones. Only weights that give a
        finite loss are saved: a step's loss is computed before its update, so the weights after it are checked here."""
        acc = self.accelerator
        acc.wait_for_everyone()
        self._check_weights()
        target = self.run_dir / f"checkpoint-{self.step}"
        # every rank's RNG and data cursor go into the same atomic write as the weights: `latest` never points at a
        # checkpoint missing a rank's state
        buffer = io.BytesIO()  # serialized here: gathering raw tensors through pickle fails on some torch builds
        torch.save({"rng": _rng_state(), "loader": self.train_loader.state_dict()}, buffer)
        all_ranks = gather_object([buffer.getvalue()]) if acc.num_processes > 1 else [buffer.getvalue()]
        # collectives under FSDP (every rank takes part); the full tensors land on rank 0's CPU
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.prepared, options=full) if self.sharded else None
        optimizer_state = get_optimizer_state_dict(self.prepared, self.optimizer.optimizer, options=full)
        if acc.is_main_process:
            with disk_full_said(target), atomic_dir(target) as tmp:
                self.weights_io.save(self.raw_model, tmp, state=weights)
                state = tmp / STATE_DIR
                state.mkdir()
                torch.save(optimizer_state, state / "optimizer.pt")
                for rank, blob in enumerate(all_ranks):
                    (state / f"rank{rank}.pt").write_bytes(blob)
                write_json(state / "trainer_state.json", {
                    "step": self.step, "total_steps": self.total_steps, "world_size": acc.num_processes,
                    "config": dataclasses.asdict(self.cfg), "batch": self.batch_plan.state(),
                    "run": self.run_info})
            point_latest(self.run_dir, target)
        acc.wait_for_everyone()
        if acc.is_main_process and self.cfg.save_total_limit > 0:
            for old in checkpoint_dirs(self.run_dir)[:-self.cfg.save_total_limit]:
                if old.resolve() != target.resolve():
                    shutil.rmtree(old, ignore_errors=True)
        self.log(f"saved {target}")
        return target

    @torch.no_grad()
    def _check_weights(self) -> None:
        """The weights about to be saved are finite and give a finite loss on the last micro-batch (every rank
        takes part: under FSDP the forward gathers the weights)."""
        acc = self.accelerator
        bad = torch.zeros((), device=acc.device)
        for p in self.prepared.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard under FSDP
                bad += (~torch.isfinite(local)).any().float()
        if self._last_batch is not None:
            batch = {k: v.to(acc.device) for k, v in self._last_batch.items()}
            self.prepared.eval()  # no dropout: the check draws no random numbers, so a resumed run stays exact
            with acc.autocast():
                loss, _ = self.objective(self.prepared, batch)
            self.prepared.train()
            bad += (~torch.isfinite(loss.float())).float()
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLoss(f"the weights after step {self.step} are not finite or give a non-finite loss; "
                                f"stopped without saving them. {self.last_good()}")

    def last_good(self) -> str:
        """Where a stopped run can go on from, in words."""
        found = checkpoint_dirs(self.run_dir)
        return (f"The last good checkpoint is {found[-1]}." if found else
                "No checkpoint was saved: lower --lr or raise --warmup-steps and start again.")

    def load_training_state(self, ckpt: Path) -> None:
        """Optimizer, RNG, data cursor and step (the weights went in before wrapping, in __init__)."""
        acc = self.accelerator
        state = ckpt / STATE_DIR
        meta = read_training_state(ckpt)
        # rank 0 reads the full optimizer state and sends each rank its part (its shard under FSDP)
        broadcast = acc.num_processes > 1
        optimizer_state = {}
        if acc.is_main_process or not broadcast:
            optimizer_state = load_tensor_file(state / "optimizer.pt", map_location="cpu")
            if not all(isinstance(k, str) for k in optimizer_state.get("state", {})):
                raise ValueError(f"{state / 'optimizer.pt'}: optimizer state keyed by position, not parameter name "
                                 "(an earlier format); start a new run from its weights instead "
                                 "(pretrain / sft --init)")
        set_optimizer_state_dict(self.prepared, self.optimizer.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))
        per_rank = load_tensor_file(state / f"rank{acc.process_index}.pt")
        _set_rng_state(per_rank["rng"])
        self.train_loader.load_state_dict(per_rank["loader"])
        self.step = meta["step"]
        self.log(f"resumed from {ckpt} at step {self.step}")

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model, objective = self.model, self.objective
        model.eval()
        total = torch.zeros(2 + len(objective.stat_names), device=self.accelerator.device)  # loss, units, statistics
        for batch in self.eval_loader(self.eval_rows, self.cfg.batch_size):
            n = objective.units(batch)
            with self.accelerator.autocast():
                loss, stats = objective(model, {k: v.to(self.accelerator.device) for k, v in batch.items()})
            total += torch.cat([torch.stack([loss.float() * n, torch.full_like(total[0], n)]), stats])
        total = self.accelerator.reduce(total, reduction="sum")
        model.train()
        loss, units, *stats = total.tolist()
        if units == 0:  # no metric from nothing
            self.log(f"warning: evaluation found no {objective.unit} in {self.eval_rows} rows (an empty "
                     f"valid split, or every example dropped)")
            return {}
        metrics = objective.eval_metrics(loss / units, [s / units for s in stats])
        return {f"eval/{k}": v for k, v in metrics.items()}

    # -- signals
    def _handle_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # -- train
    def train(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        acc.init_trackers("tensorboard")
        if self.resume_from is not None:
            self.load_training_state(self.resume_from)
        else:
            set_seed_everywhere(cfg.seed, acc.process_index)
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            acc.end_training()

    def _read_step(self, record: StepRecord) -> bool:
        """Wait for a finished step's summary: stop on a non-finite loss, log the first step and every `log_every`
        steps, show each step's loss beside the first's in the progress line. True when a rank was signalled to
        stop."""
        cfg, acc = self.cfg, self.accelerator
        if record.ready is not None:
            record.ready.synchronize()
        train_loss, stop_votes, *stats = record.summary.tolist()
        if not math.isfinite(train_loss):  # the same global value on every rank: all stop together
            raise NonFiniteLoss(f"non-finite training loss ({train_loss}) at step {record.step}; stopped without "
                                f"saving. {self.last_good()}")
        tokens, since = self._window
        tokens += record.tokens
        self._window = (tokens, since)
        first = self._first_loss is None
        if first:
            self._first_loss = (record.step, train_loss)
        self._last_loss = (record.step, train_loss)
        if first or record.step % cfg.log_every == 0 or record.step == self.total_steps:
            tok_s = tokens * acc.num_processes / seconds_between(since, record.end)
            named = dict(zip(self.objective.stat_names, stats))
            self._metrics = {"train/loss": train_loss, **{f"train/{k}": v for k, v in named.items()},
                             "train/lr": record.lr, "train/tokens_per_s": tok_s}
            rate = f"{tok_s:,.0f} tok/s"
            if self.peak_flops:
                mfu = tok_s * flops_per_token(self.raw_model, record.seq_len) / (self.peak_flops * acc.num_processes)
                self._metrics["train/mfu"] = mfu
                rate += f" MFU {mfu:.1%}"
            if acc.device.type == "cuda":  # this rank's high-water mark since the start
                rate += f" peak {torch.cuda.max_memory_allocated(acc.device) / 2**30:.2f} GiB"
            acc.log(self._metrics, step=record.step)
            self.log(f"step {record.step} loss {train_loss:.4f} lr {record.lr:.2e} {rate}"
                     + "".join(f" {k} {v:.4f}" for k, v in named.items()))
            self._rate = rate  # of the last logged window, shown until the next
            self._window = (0, record.end)
        step0, loss0 = self._first_loss
        start = f" (step {step0}: {loss0:.4f})" if record.step > step0 else ""
        self._progress.update(self._task, completed=record.step,
                              info=f"loss {train_loss:.4f}{start} lr {record.lr:.2e} {self._rate}")
        return stop_votes > 0

    def _loop(self) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        batches = iter(self.train_loader)
        device = acc.device.type + (f" ({torch.cuda.get_device_name(acc.device)})" if acc.device.type == "cuda" else "")
        self.log(f"training {self.trainable:,} trainable parameters for {self.total_steps} steps on "
                 f"{acc.num_processes} x {device}, {precision_in_words(self.mixed_precision, self.raw_model)}")
        for note in shortfalls(cfg, self.total_steps):
            self.log(note)
        width = self.raw_model.config.hidden_size
        if cfg.offload_activations and width < PAYS_FROM_WIDTH:
            self.log(f"warning: --offload-activations on a {width}-wide model: its blocks compute for less time than "
                     f"their saved tensors take to copy, so steps get slower; it pays from {PAYS_FROM_WIDTH}-wide "
                     f"(7B-class) models")
        self._metrics: dict[str, float] = {}
        self._first_loss: tuple[int, float] | None = None  # the first step this process read, and its loss
        # Each step's [loss, stop votes] is copied to the host asynchronously and read one step later, so the host
        # queues step k+1 while the GPU runs step k and never waits for it (a read per step would leave the GPU idle
        # while the host prepares the next one). Steps that save, evaluate or finish read at once.
        pending: collections.deque[StepRecord] = collections.deque()
        self._progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("elapsed"),
                                  TimeRemainingColumn(), TextColumn("left"), console=self.console,
                                  disable=not (acc.is_main_process and draws_live(self.console)))
        with self._progress:
            self._task = self._progress.add_task("train", total=self.total_steps, completed=self.step, info="")
            evaluated = False  # at the step just finished
            # torch.compile builds its graphs during the first step (and the first evaluation): said, so that the
            # wait is not taken for slow training
            if self.compiled:
                self._progress.update(self._task, info="compiling ...")
            if cfg.eval_at_start and self.eval_loader and self.step == 0:
                self._eval_and_log(self.raw_model)
            compiling = time.perf_counter() if self.compiled else None
            self._window = (0, window_start(acc.device))  # tokens read since the last log line, and when it ended
            started = time.perf_counter()
            while self.step < self.total_steps:
                lr = set_learning_rate(self.optimizer, self.step, self.total_steps, cfg)
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                self._last_batch = micro[-1]
                counts = [self.objective.units(b) for b in micro]  # CPU tensors: no device sync
                # One unit-weighted mean over the window and all ranks (micro-batches with few answer tokens, or
                # pairs, do not weigh as much as full ones): accelerate divides each backward by grad_accum and DDP
                # averages over ranks, so micro-batch i's mean loss is scaled by n_i * grad_accum * world / N.
                # Exactly 1 when every micro-batch has the same count (pretraining). torch.full, not torch.tensor: a
                # fill kernel, where a host-to-device copy would wait for the GPU.
                window = torch.full((), float(sum(counts)), device=acc.device)
                if acc.num_processes > 1:
                    window = acc.reduce(window, reduction="sum")
                window = window.clamp(min=1)
                weighted = torch.zeros((), device=acc.device)
                stat_sums = torch.zeros(len(self.objective.stat_names), device=acc.device)
                for batch, n in zip(micro, counts):
                    batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items()}
                    with acc.accumulate(self.model), acc.autocast():
                        loss, stats = self.objective(self.model, batch)
                        acc.backward(loss * (n * cfg.grad_accum * acc.num_processes / window))
                        if acc.sync_gradients and cfg.grad_clip > 0:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    weighted += loss.detach().float() * n
                    stat_sums += stats
                stop = torch.full((), float(self._stop_signal is not None), device=acc.device)
                summary = torch.cat([torch.stack([weighted / window, stop]), stat_sums / window])
                if acc.num_processes > 1:  # the loss over all ranks, and whether any rank was signalled
                    summary = acc.reduce(summary, reduction="sum")
                self.step += 1
                if compiling is not None:
                    self.log(f"compiled: the first step took {time.perf_counter() - compiling:.1f} s")
                    self._progress.update(self._task, info="")
                    compiling = None
                tokens = sum(b["input_ids"].numel() for b in micro)
                pending.append(StepRecord(self.step, lr, tokens, micro[-1]["input_ids"].shape[1], *to_host(summary)))
                evaluate = bool(self.eval_loader) and cfg.eval_every > 0 and self.step % cfg.eval_every == 0
                save = cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < self.total_steps
                due = evaluate or save or self.step == self.total_steps
                stopped = False  # every rank reads the same steps; a stop drains them, so a saved step was checked
                while pending and (due or stopped or len(pending) > 1):
                    stopped = self._read_step(pending.popleft()) or stopped
                if stopped:  # all ranks saw the vote at the same step; the state saved is the newest step's
                    why = (f"received signal {self._stop_signal}" if self._stop_signal is not None
                           else "another rank received a signal")
                    self.log(f"{why}: saving and stopping at step {self.step}")
                    raise TrainingStopped(self._stop_signal or signal.SIGTERM, self.save_checkpoint())
                if evaluate:
                    self._eval_and_log(self.raw_model)
                evaluated = evaluate
                if save:
                    self.save_checkpoint()
        if self._first_loss is not None:
            (step0, loss0), (step1, loss1) = self._first_loss, self._last_loss
            took = datetime.timedelta(seconds=round(time.perf_counter() - started))
            self.log(f"steps {step0}-{step1} took {took}: loss {loss0:.4f} -> {loss1:.4f}")
        metrics = self._metrics
        if self.eval_loader:  # once at the end (the last step may have evaluated already)
            metrics |= self._last_eval if evaluated else self._eval_and_log(self.raw_model)
        self.save_checkpoint()
        return metrics

    def _eval_and_log(self, unwrapped: nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        metrics = self.evaluate()
        if self.knowledge_fn and self.accelerator.is_main_process:
            metrics |= self.knowledge_fn(unwrapped)  # restores train mode itself
        took = time.perf_counter() - started
        self.accelerator.log(metrics, step=self.step)
        self._last_eval = metrics
        self.log(f"eval step {self.step}: " + " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items())
                 + f" ({took:.1f} s)")
        if self.sample_fn and self.accelerator.is_main_process:
            unwrapped.eval()
            for question, answer in self.sample_fn(unwrapped):
                self.log(f"sample: {question} -> {answer!r}")
            unwrapped.train()
        return metrics


def set_seed_everywhere(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
