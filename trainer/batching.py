"""The batch plan: rows per micro-batch and micro-batches per optimizer step, from a token budget (issue 33).

A step's batch is counted in tokens per process: rows x row length x accumulation, a row's length being its
positions, padding included (--seq-len for pretraining, --max-seq-length for SFT and LoRA, twice that for DPO, whose
rows hold a pair's two sequences side by side). Rows hold whole examples (SFT, LoRA) or whole pairs (DPO) as the
packer made them; the plan only chooses how many rows go into a micro-batch, so it never splits an example, and the
rows come in the same order whatever the split (the loaders serve one stream of rows: trainer/data.py).

The rule, in order:
1. `--batch-size` and `--grad-accum` keep their meaning: given, they are used as they are (`--batch-size` alone
   accumulates 1 micro-batch, or as many as `--tokens-per-batch N` needs).
2. A resumed run takes the plan saved with its checkpoint (trainer_state.json "batch"), unless the flags that made
   it changed: it never probes again, so a GPU with more or less free memory today keeps the run exact.
3. On the CPU (or a loader that cannot make probe batches): today's small batch, the stage's `cpu_rows` rows (8; 4
   for lora and dpo) and no accumulation; an explicit `--tokens-per-batch N` accumulates micro-batches of at most
   that many rows up to N.
4. On a GPU: the budget is `--tokens-per-batch N`, or the stage's `gpu_tokens_per_batch` (trainer/config.py),
   lowered for small data so that the run keeps at least MIN_STEPS_PER_WARMUP x --warmup-steps optimizer steps (but
   never below today's batch). A probe (`probe_memory`) runs the stage's real step (model, objective, activation
   policy, mixed precision; eagerly) on 1 and 2 rows of the training data and reads the peak memory: the step costs
   `fixed + rows x per_row` bytes, the optimizer state still to come added to `fixed`. Rows per micro-batch: the most
   that keep that peak within MEMORY_SHARE of the memory this process can use, the data (no more rows than an epoch
   gives each process) and the budget allow, rounded down to a power of two (below 8) or a multiple of 8; the
   accumulation then takes the step as close to the budget as it gets without passing it (`plan_batch`).
The plan is printed at the start of a run, and saved in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

AUTO = "auto"
# The share of the memory this process can use (free + what torch's allocator holds) that the probed step's peak may
# reach. The rest covers what a probe of the eager step does not see: inductor's and cuBLAS' workspaces, allocator
# fragmentation over a long run, DDP / NCCL buffers, evaluation and sample generation between steps.
MEMORY_SHARE = 0.8
PROBE_ROWS = (1, 2)  # rows of the two measured probe steps: the peak's slope gives the cost of a row
MIN_STEPS_PER_WARMUP = 4  # auto's budget shrinks on small data so that warmup is at most a quarter of the run


@dataclass(frozen=True)
class BatchPlan:
    """Rows per micro-batch and micro-batches per optimizer step, per process; `request` is the --tokens-per-batch
    the plan was made for ("auto" or a number), `reason` why it is what it is, in words."""

    rows: int
    grad_accum: int
    row_tokens: int
    request: int | str = AUTO
    reason: str = ""

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step per process (row positions, padding included)."""
        return self.rows * self.grad_accum * self.row_tokens

    def describe(self, world_size: int = 1) -> str:
        if not self.row_tokens:
            return f"batch: {self.rows} rows x {self.grad_accum} micro-batches per step per process ({self.reason})"
        processes = f", x {world_size} processes = {self.tokens * world_size:,}" if world_size > 1 else ""
        return (f"batch: {self.tokens:,} tokens per step per process{processes} = {self.rows} rows x "
                f"{self.row_tokens} tokens x {self.grad_accum} micro-batch{'es' if self.grad_accum > 1 else ''} "
                f"({self.reason})")

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MemoryProbe:
    """What a probe measured: the step's peak is `fixed_bytes + rows x bytes_per_row` (the optimizer state, not yet
    allocated at the probe, counted in fixed_bytes); `usable_bytes` is the device memory this process can use."""

    bytes_per_row: float
    fixed_bytes: float
    usable_bytes: float

    def rows_that_fit(self, share: float = MEMORY_SHARE) -> int:
        return math.floor((share * self.usable_bytes - self.fixed_bytes) / max(self.bytes_per_row, 1.0))

    def describe(self, share: float = MEMORY_SHARE) -> str:
        return (f"probe: {self.fixed_bytes / 2**30:.2f} GiB + {self.bytes_per_row / 2**20:.1f} MiB per row, "
                f"{share:.0%} of {self.usable_bytes / 2**30:.1f} GiB fits {max(self.rows_that_fit(share), 0):,} rows")


def nice_rows(n: int) -> int:
    """n rounded down to a power of two below 8, to a multiple of 8 from 8 on (at least 1)."""
    if n >= 8:
        return n - n % 8
    return 1 << (max(n, 1).bit_length() - 1)


def plan_batch(row_tokens: int, bytes_per_row: float | None, free_bytes: float | None, target_tokens: int,
               max_rows: int | None, *, fixed_bytes: float = 0.0, share: float = MEMORY_SHARE,
               grad_accum: int | None = None, request: int | str = AUTO) -> BatchPlan:
    """The plan for a budget of `target_tokens` per step, from injected measurements: a row's memory
    (`bytes_per_row`, None when nothing was measured: no memory bound), the memory usable (`free_bytes`) of which
    `share` may be reached, `fixed_bytes` the step's cost without rows; `max_rows` the most rows a micro-batch may
    hold (the data's bound; None: none). `grad_accum` fixes the accumulation (--grad-accum).

    The budget in rows is S = target_tokens // row_tokens (at least 1). The rows per micro-batch are bounded by
    memory, data and S (S / grad_accum when that is fixed); of the rounded row counts r in (top / 2, top], top the
    bound rounded (`nice_rows`), the one whose step r x (S // r) comes closest to S wins (ties: the larger r)."""
    step_rows = max(1, target_tokens // row_tokens)
    bounds = {"the budget": step_rows if grad_accum is None else max(1, step_rows // grad_accum)}
    if max_rows is not None:
        bounds["the data"] = max(1, max_rows)
    notes = []
    if bytes_per_row is not None and free_bytes is not None:
        fit = math.floor((share * free_bytes - fixed_bytes) / max(bytes_per_row, 1.0))
        bounds["memory"] = max(1, fit)
        if fit < 1:
            notes.append(f"a row needs more than {share:.0%} of the memory: expect to run out; "
                         f"--gradient-checkpointing or shorter rows")
    limit = min(bounds, key=lambda k: (bounds[k], k != "memory"))
    top = nice_rows(bounds[limit])
    if grad_accum is not None:
        rows, accum = top, grad_accum
    else:
        candidates = [r for r in range(top, top // 2, -1) if nice_rows(r) == r]
        rows = max(candidates, key=lambda r: (r * (step_rows // r), r))
        accum = max(1, step_rows // rows)
    return BatchPlan(rows, accum, row_tokens, request, "; ".join([f"rows bounded by {limit}", *notes]))


def step_rows_cap(data_rows: int | None, epochs: float, max_steps: int, warmup_steps: int, floor: int) -> int | None:
    """The most rows per process an auto step may take so that the run keeps MIN_STEPS_PER_WARMUP x warmup_steps
    steps over its epochs, never fewer than `floor` (today's batch); None when the run's steps are set (--max-steps),
    there is no warmup, or the data's size is unknown."""
    if max_steps > 0 or warmup_steps <= 0 or data_rows is None:
        return None
    return max(floor, int(data_rows * epochs) // (MIN_STEPS_PER_WARMUP * warmup_steps))


def saved_plan(training_state: dict) -> dict | None:
    """The plan a checkpoint's trainer_state.json holds; for a checkpoint from before plans were saved, the
    --batch-size and --grad-accum of its config."""
    if "batch" in training_state:
        return training_state["batch"]
    config = training_state.get("config", {})
    if config.get("batch_size") and config.get("grad_accum"):
        return {"rows": config["batch_size"], "grad_accum": config["grad_accum"],
                "request": config.get("tokens_per_batch", AUTO)}
    return None


def choose_batch(cfg: Any, row_tokens: int, epoch_rows: int | None, world_size: int = 1,
                 probe: Callable[[], MemoryProbe] | None = None, saved: dict | None = None,
                 stage: str = "the stage") -> BatchPlan:
    """The run's plan (the module docstring's rule). cfg: a TrainConfig; epoch_rows: packed rows in an epoch, over
    all processes (None: unknown); probe: measures the step on this device (None on the CPU); saved: the plan of the
    checkpoint the run resumes from (`saved_plan`)."""
    request, cpu_rows = cfg.tokens_per_batch, cfg.cpu_rows
    data_rows = None if epoch_rows is None else max(1, epoch_rows // world_size)
    explicit = request != AUTO
    if not row_tokens:  # a loader that does not say its row length: no budget in tokens
        return BatchPlan(cfg.start_rows, cfg.grad_accum or 1, 0, request, "--batch-size or the default rows, "
                         "--grad-accum or 1: the loader does not say its row length")
    if cfg.batch_size and cfg.grad_accum:
        ignored = " (--tokens-per-batch ignored)" if explicit else ""
        return BatchPlan(cfg.batch_size, cfg.grad_accum, row_tokens, request,
                         f"set by --batch-size and --grad-accum{ignored}")
    if cfg.batch_size:
        accum = max(1, request // (cfg.batch_size * row_tokens)) if explicit else 1
        why = ", accumulation from --tokens-per-batch" if explicit else ""
        return BatchPlan(cfg.batch_size, accum, row_tokens, request, f"set by --batch-size{why}")
    if saved is not None and not cfg.grad_accum and saved.get("request", AUTO) == request:
        return BatchPlan(int(saved["rows"]), int(saved["grad_accum"]), row_tokens, request,
                         "the plan saved with the checkpoint resumed from")
    fixed = " with --grad-accum" if cfg.grad_accum else ""
    if probe is None:
        cap = cpu_rows if data_rows is None else min(cpu_rows, data_rows)
        if not explicit:  # today's batch
            return BatchPlan(nice_rows(cap) if cap < cpu_rows else cpu_rows, cfg.grad_accum or 1, row_tokens,
                             request, "the CPU default" + (", capped by the data" if cap < cpu_rows else ""))
        plan = plan_batch(row_tokens, None, None, request, cap, grad_accum=cfg.grad_accum, request=request)
        return dataclasses.replace(plan, reason=f"--tokens-per-batch on the CPU{fixed}, at most {cpu_rows} rows; "
                                                f"{plan.reason}")
    if explicit:
        target, budget = request, "--tokens-per-batch"
    else:
        target, budget = cfg.gpu_tokens_per_batch, f"{stage}'s GPU default {cfg.gpu_tokens_per_batch:,}"
        cap = step_rows_cap(data_rows, cfg.epochs, cfg.max_steps, cfg.warmup_steps, cpu_rows)
        if cap is not None and cap * row_tokens < target:
            target = cap * row_tokens
            budget += (f" lowered to {target:,} to keep {MIN_STEPS_PER_WARMUP} x --warmup-steps steps on this "
                       f"data")
    measured = probe()
    plan = plan_batch(row_tokens, measured.bytes_per_row, measured.usable_bytes, target, data_rows,
                      fixed_bytes=measured.fixed_bytes, grad_accum=cfg.grad_accum, request=request)
    return dataclasses.replace(plan, reason=f"budget {budget}{fixed}; {plan.reason}; {measured.describe()}")


def probe_from_peaks(rows: tuple[int, int], peaks: tuple[float, float], extra_bytes: float,
                     usable_bytes: float) -> MemoryProbe:
    """A MemoryProbe from the peaks of steps of rows[0] and rows[1] rows: their slope is a row's cost, and what is
    left at no rows, plus `extra_bytes` (the optimizer state to come), the fixed cost."""
    per_row = max((peaks[1] - peaks[0]) / (rows[1] - rows[0]), 1.0)
    return MemoryProbe(per_row, peaks[0] - rows[0] * per_row + extra_bytes, usable_bytes)


def optimizer_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's two moments of every trainable parameter (this process's shard under FSDP): allocated at the first
    optimizer step, after the probe (Muon's one buffer for its matrices counts as two: a margin)."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += 2 * local.numel() * local.element_size()
    return total


def probe_memory(step: Callable[[int], None], device: torch.device, extra_bytes: float) -> MemoryProbe:
    """Measure `step(rows)` (one forward and backward of `rows` rows, gradients dropped after) on a CUDA device: a
    warm-up step (lazy allocations, kernel autotuning), then the peaks of PROBE_ROWS; under several processes every
    rank gets the most cautious figures (largest costs, least memory), so all plan alike."""
    step(PROBE_ROWS[0])
    peaks = []
    for rows in PROBE_ROWS:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(rows)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    measured = probe_from_peaks(PROBE_ROWS, tuple(peaks), extra_bytes, free + torch.cuda.memory_reserved(device))
    torch.cuda.reset_peak_memory_stats(device)  # the run's own peak is what the progress line reports
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        figures = torch.tensor([measured.bytes_per_row, measured.fixed_bytes, -measured.usable_bytes],
                               dtype=torch.float64, device=device)
        torch.distributed.all_reduce(figures, op=torch.distributed.ReduceOp.MAX)
        per_row, fixed, usable = figures.tolist()
        measured = MemoryProbe(per_row, fixed, -usable)
    return measured


def can_probe(device: torch.device) -> bool:
    """Whether the plan measures this device (CUDA); on the CPU it keeps today's small batches."""
    return device.type == "cuda"
