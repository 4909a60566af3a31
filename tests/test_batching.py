"""The batch plan (trainer/batching.py, issue 33): a token budget per step, rows fitted to a share of the memory a
probe measured (injected here), the data's bound, explicit flags first, today's small batch on the CPU, a resumed
run's saved plan, and --compile's auto."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import train
from trainer.batching import (
    MEMORY_SHARE,
    MIN_STEPS_PER_WARMUP,
    BatchPlan,
    MemoryProbe,
    choose_batch,
    nice_rows,
    plan_batch,
    probe_from_peaks,
    saved_plan,
)
from trainer.config import DPOConfig, LoraConfig, PretrainConfig, SFTConfig
from trainer.data import SFTLoader
from trainer.loop import resolve_compile
from utils.templates import SFTExamples

GiB, MiB = 2**30, 2**20
CONFIGS = {"pretrain": lambda **kw: PretrainConfig(data="d", tokenizer="t", **kw),
           "sft": lambda **kw: SFTConfig(init="m", data="d", **kw),
           "lora": lambda **kw: LoraConfig(base="m", data="d", **kw),
           "dpo": lambda **kw: DPOConfig(init="m", data="d", **kw)}


def never_probed() -> MemoryProbe:
    raise AssertionError("the plan must not probe here")


def gpu(per_row: float = 20 * MiB, fixed: float = 2 * GiB, usable: float = 80 * GiB):
    return lambda: MemoryProbe(per_row, fixed, usable)


@pytest.mark.parametrize("row, per_row, free, fixed, target, max_rows", [
    (512, 20 * MiB, 80 * GiB, 2 * GiB, 131072, None),  # the budget binds: 256 rows, no accumulation
    (512, 1 * GiB, 80 * GiB, 10 * GiB, 131072, None),  # memory binds (54 rows): 32 x 8 reaches 256 exactly
    (512, 1 * GiB, 80 * GiB, 10 * GiB, 131072, 20),  # the data binds: 16 x 16
    (512, 20 * MiB, 80 * GiB, 2 * GiB, 100000, None),  # a budget of 195.3 rows: 192
    (2048, 600 * MiB, 24 * GiB, 14 * GiB, 32768, None),  # a 7B LoRA on a 24 GiB card: 8 rows x 2
    (1024, 3 * MiB, 10 * GiB, 9 * GiB, 65536, 1000),  # 0.8 x 10 GiB < 9 GiB fixed: one row, said
    (512, 1 * MiB, 80 * GiB, 0, 100, None),  # a budget under one row: one row
])
def test_the_plan_honours_the_token_budget_memory_share_and_data(row, per_row, free, fixed, target, max_rows):
    plan = plan_batch(row, per_row, free, target, max_rows, fixed_bytes=fixed)
    budget_rows = max(1, target // row)
    fit = int((MEMORY_SHARE * free - fixed) // per_row)
    bound = min(max(fit, 1), max_rows or budget_rows, budget_rows)
    assert plan.row_tokens == row and plan.rows == nice_rows(plan.rows) <= bound
    assert plan.rows * plan.grad_accum <= budget_rows  # never over the budget
    assert plan.rows * plan.grad_accum > budget_rows - nice_rows(bound)  # short of it by less than a micro-batch
    if fit >= 1:
        assert fixed + plan.rows * per_row <= MEMORY_SHARE * free
    else:
        assert plan.rows == 1 and "expect to run out" in plan.reason
    assert plan == plan_batch(row, per_row, free, target, max_rows, fixed_bytes=fixed)  # deterministic


def test_rows_are_powers_of_two_then_multiples_of_8_and_the_step_meets_the_budget():
    assert [nice_rows(n) for n in (0, 1, 2, 3, 5, 7, 8, 15, 17, 100)] == [1, 1, 2, 2, 4, 4, 8, 8, 16, 96]
    assert (lambda p: (p.rows, p.grad_accum))(plan_batch(512, GiB, 80 * GiB, 131072, None, fixed_bytes=10 * GiB)) \
        == (32, 8)
    # --grad-accum fixed: the rows per micro-batch follow the budget and memory
    plan = plan_batch(512, GiB, 80 * GiB, 131072, None, fixed_bytes=10 * GiB, grad_accum=4)
    assert (plan.rows, plan.grad_accum) == (48, 4)
    plan = plan_batch(512, 20 * MiB, 80 * GiB, 131072, None, grad_accum=4)
    assert (plan.rows, plan.grad_accum) == (64, 4)


def test_auto_on_the_cpu_is_todays_batch_and_never_probes():
    today = {"pretrain": 8, "sft": 8, "lora": 4, "dpo": 4}  # the --batch-size defaults before plans existed
    for stage, make in CONFIGS.items():
        cfg = make()
        assert (cfg.batch_size, cfg.grad_accum, cfg.tokens_per_batch, cfg.compile) == (None, None, "auto", None)
        assert cfg.start_rows == today[stage]
        plan = choose_batch(cfg, 512, epoch_rows=10_000, probe=None)
        assert (plan.rows, plan.grad_accum, plan.reason) == (today[stage], 1, "the CPU default")
    # the command line's defaults are the same
    args = train.build_parser(["sft"]).parse_args(["sft", "--init", "m", "--data", "d"])
    assert (args.batch_size, args.grad_accum, args.tokens_per_batch, args.compile) == (None, None, "auto", None)
    args = train.build_parser(["sft"]).parse_args(["sft", "--init", "m", "--data", "d", "--tokens-per-batch",
                                                   "4096", "--no-compile"])
    assert (args.tokens_per_batch, args.compile) == (4096, False)
    with pytest.raises(SystemExit):
        train.build_parser(["sft"]).parse_args(["sft", "--init", "m", "--data", "d", "--tokens-per-batch", "0"])
    # data smaller than the default batch: the rows an epoch has
    assert choose_batch(CONFIGS["lora"](), 2048, epoch_rows=2, probe=None).rows == 2
    # an explicit budget on the CPU: micro-batches of at most the default rows, accumulated
    plan = choose_batch(CONFIGS["sft"](tokens_per_batch=16384), 512, epoch_rows=10_000, probe=None)
    assert (plan.rows, plan.grad_accum) == (8, 4)


def test_explicit_flags_win_over_auto():
    sft = CONFIGS["sft"]
    for cfg, expected in [(sft(batch_size=16), (16, 1)), (sft(batch_size=16, tokens_per_batch=65536), (16, 8)),
                          (sft(batch_size=3, grad_accum=5, tokens_per_batch=65536), (3, 5)),
                          (sft(batch_size=16, grad_accum=2), (16, 2))]:
        plan = choose_batch(cfg, 512, 10_000, probe=never_probed, saved={"rows": 64, "grad_accum": 9})
        assert (plan.rows, plan.grad_accum) == expected and "--batch-size" in plan.reason
    assert (lambda p: (p.rows, p.grad_accum))(choose_batch(sft(grad_accum=3), 512, 10_000, probe=None)) == (8, 3)
    plan = choose_batch(sft(grad_accum=4), 512, 10**6, probe=gpu())
    assert (plan.rows, plan.grad_accum) == (32, 4)  # 65536 / 512 / 4
    with pytest.raises(ValueError, match="at least 1"):
        sft(batch_size=0)


def test_auto_on_a_gpu_fills_memory_up_to_the_stage_budget_and_keeps_enough_steps():
    for stage, budget in (("pretrain", 131072), ("sft", 65536), ("lora", 32768)):
        plan = choose_batch(CONFIGS[stage](), 512, 10**7, probe=gpu())
        assert plan.tokens == budget and plan.grad_accum == 1 and "probe:" in plan.reason
    plan = choose_batch(CONFIGS["dpo"](), 1024, 10**7, probe=gpu(per_row=40 * MiB))
    assert plan.tokens == 32768 and plan.row_tokens == 1024  # a DPO row: a pair's two sequences side by side
    # tight memory: accumulation makes up the budget
    plan = choose_batch(CONFIGS["sft"](), 512, 10**7, probe=gpu(per_row=GiB, fixed=10 * GiB))
    assert (plan.rows, plan.grad_accum, plan.tokens) == (32, 4, 65536)
    # small data: 2000 rows x 2 epochs keep 4 x 50 warmup steps, the step no smaller than today's
    cfg = CONFIGS["sft"]()
    plan = choose_batch(cfg, 512, 2000, probe=gpu())
    assert plan.rows * plan.grad_accum <= 2 * 2000 // (MIN_STEPS_PER_WARMUP * cfg.warmup_steps) and plan.rows >= 8
    assert "lowered" in plan.reason
    assert choose_batch(cfg, 512, 100, probe=gpu()).rows == 8
    # --max-steps fixes the steps: the whole budget, micro-batches no larger than an epoch's rows per process
    plan = choose_batch(CONFIGS["sft"](max_steps=10), 512, 100, world_size=2, probe=gpu())
    assert plan.rows <= 50 and plan.rows * plan.grad_accum == 128


def test_a_resumed_run_takes_its_saved_plan_whatever_the_probe_would_say():
    cfg = CONFIGS["pretrain"]()
    first = choose_batch(cfg, 512, 10**7, probe=gpu(fixed=60 * GiB))  # little room: small micro-batches
    saved = saved_plan({"batch": first.state()})
    again = choose_batch(cfg, 512, 10**7, probe=never_probed, saved=saved)
    assert (again.rows, again.grad_accum) == (first.rows, first.grad_accum) and first.grad_accum > 1
    assert choose_batch(cfg, 512, 10**7, probe=gpu(), saved=None).rows > first.rows
    # the flags that made the plan changed: planned again
    other = choose_batch(CONFIGS["pretrain"](tokens_per_batch=65536), 512, 10**7, probe=gpu(), saved=saved)
    assert other.tokens == 65536
    # a checkpoint from before plans were saved: its config's batch
    assert saved_plan({"config": {"batch_size": 8, "grad_accum": 2}}) == {"rows": 8, "grad_accum": 2,
                                                                          "request": "auto"}
    assert BatchPlan(**first.state()) == first


def test_a_probe_reads_a_rows_cost_from_two_peaks():
    probe = probe_from_peaks((1, 2), (3 * GiB + 50 * MiB, 3 * GiB + 100 * MiB), GiB, 80 * GiB)
    assert probe.bytes_per_row == 50 * MiB and probe.fixed_bytes == 4 * GiB
    assert probe.rows_that_fit() == int((0.8 * 80 * GiB - 4 * GiB) // (50 * MiB))


def test_compile_auto_is_on_for_cuda_and_off_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_compile(None, cpu), resolve_compile(None, cuda)) == (False, True)
    assert (resolve_compile(True, cpu), resolve_compile(False, cuda)) == (True, False)


def sft_examples(lengths: list[int]) -> SFTExamples:
    """Examples whose tokens are their positions in the corpus: a row says which examples it holds, and whole."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return SFTExamples(np.arange(n, dtype=np.int32), np.ones(n, dtype=bool), offsets, {})


def served(loader: SFTLoader, batches: int) -> list[np.ndarray]:
    """Each served row's input_ids, in order."""
    it = iter(loader)
    return [row for _ in range(batches) for row in next(it)["input_ids"].numpy()]


def test_planned_batches_hold_whole_examples_in_the_same_order_however_split():
    lengths = np.random.default_rng(0).integers(5, 120, 400).tolist()
    examples = sft_examples(lengths)
    offsets = examples.offsets
    loader = SFTLoader(examples, pad_id=-1, max_seq_len=128, batch_size=8, seed=3)
    assert loader.row_tokens == 128 and loader.rows_per_epoch == loader.plan().n_rows
    plan = choose_batch(CONFIGS["sft"](tokens_per_batch=4096, max_steps=5), loader.row_tokens,
                        loader.rows_per_epoch, probe=gpu(per_row=MiB, fixed=0, usable=5 * MiB))
    assert (plan.rows, plan.grad_accum) == (4, 8)  # 0.8 x 5 MiB fits 4 rows; 32 rows per step
    probe = loader.probe_batch(2)
    assert probe["input_ids"].shape == (2, 128) and (loader.epoch, loader.row) == (0, 0)  # the position stays
    loader.batch_size = plan.rows
    rows = served(loader, 3 * plan.grad_accum)
    for row in rows:
        starts = np.flatnonzero(np.isin(row, offsets[:-1]))  # where an example begins
        ends = list(starts[1:]) + [int((row >= 0).sum())]
        for s, e in zip(starts, ends):
            example = int(np.searchsorted(offsets, row[s]))
            assert (row[s:e] == np.arange(offsets[example], offsets[example + 1] - 1)).all()  # whole, in order
    whole = SFTLoader(examples, pad_id=-1, max_seq_len=128, batch_size=32, seed=3)
    assert all((a == b).all() for a, b in itertools.zip_longest(rows, served(whole, 3)))
