"""DPO with LoRA on the Llama-7B shape: ours (trainer/dpo.py) against TRL's DPOTrainer + PEFT, side by side in one
process on one GPU (issue 32: at least 1.5x TRL's pairs/s at no more peak memory; QLoRA DPO under 10 GiB).

    python bench/dpo.py [--only lora compiled qlora] [--out DIR] [--commit SHA]
    python bench/dpo.py --shape tiny --device cpu --out /tmp/dpo-smoke      # both sides end to end, on the CPU

Random weights (bench/gpu.py `build`), random token ids (never 0, the pad id), bf16 weights under bf16 autocast on
the GPU (float32 on the CPU). A batch is 2 pairs, each a prompt of 512 tokens with a chosen and a rejected answer of
512: four sequences of 1024 tokens, 4096 tokens through the policy (and again through the reference) per step.
Ours packs a pair's two sequences side by side in one row of 2 x 1024 positions (trainer/data.py `PairLoader`, what
`train.py dpo --max-seq-length 1024 --batch-size 2` feeds the loop); TRL pads them into 4 rows of 1024, chosen then
rejected (its collator).

One timed step is one optimizer step: the reference's forward under no_grad (the base with the adapters disabled),
the policy's forward of chosen and rejected, the backward, a fused AdamW step (lr 1e-4, no weight decay, no
clipping) over the trainable LoRA weights; the same optimizer on both sides. Ours runs `DPOObjective` with
`base_reference`, what `train.py dpo --lora` builds; TRL runs `trainer.compute_loss(trainer.model, inputs)` (its
reference forward, policy forward and the metrics it logs, `.item()` reads included) on a batch from its own
collator, under `trainer.accelerator.autocast()` (what `Trainer.train` wraps the forward in), then backward and the
step, as tests/test_dpo.py's `trl_step` drives it. `Trainer.training_step` is not used: outside `train()` the model is
not prepared by accelerate, so it would run without autocast.

Settings, both sides: LoRA r=8, alpha 16 on q_proj and v_proj (adapter weights in float32, PEFT's default), beta 0.1,
sigmoid loss, activation checkpointing. Dropout is 0 in effect on both: ours at `train.py dpo`'s default (0), TRL's
PEFT config says 0.05 and its `disable_dropout=True` (its default) zeroes it, so that the policy is scored against an
intact reference. TRL: `ref_model=None` (the adapter-disabled base is its reference), gradient checkpointing with
`use_reentrant=False`, `bf16=True`, `max_length=None` (nothing to cut), its fused log-probability head.

Figures (pairs/s; "peak" is torch's peak allocated GPU memory from after the model is built to the end of the timed
steps):
- `dpo_7b_lora_qv_r8`: ours eager, every block recomputed in the backward (`--gradient-checkpointing`), against TRL.
- `dpo_7b_lora_qv_r8_compiled`: ours as `--gradient-checkpointing --compile --offload-activations` runs it (what
  docs/training.md gives as the fastest 7B setting on a GPU): a compiled graph per decoder block and a compiled head,
  recomputed blocks saving their MLP gate/up outputs to pinned host memory (the last 4 on the GPU); the reference
  pass (no_grad) runs the compiled blocks too, as in the trainer. Against the same TRL (eager).
- `dpo_7b_qlora_qv_r8`: ours with an NF4 base (`--qlora`, eager) against our bf16 LoRA eager; goal peak < 10 GiB.

Each side's first step is checked before timing: every LoRA B moves (A gets no gradient while B is 0), and the loss
(`*_first_loss`) is log 2 = 0.6931 there, policy and reference being the same model. Writes DIR/results.json and
DIR/results.md as bench/gpu.py does; each figure as soon as it is measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu import LLAMA_7B, GiB, Measured, Report, build, free, measure, quantize_blocks  # noqa: E402

from model import ModelConfig  # noqa: E402
from model.lora import apply_lora  # noqa: E402
from trainer.activations import OFFLOAD_SKIP_LAST, ActivationPolicy, apply_activation_policy, compiles_per_block  # noqa: E402,E501
from trainer.data import PairExamples, PairLoader  # noqa: E402
from trainer.dpo import DPOObjective, PreferenceLoss, as_scorer, base_reference  # noqa: E402

R, ALPHA, TARGETS, BETA, LR = 8, 16, ["q_proj", "v_proj"], 0.1, 1e-4
PEAK_GOAL_QLORA_GIB, SPEEDUP_GOAL = 10.0, 1.5
TINY = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=192, max_position_embeddings=128, tie_word_embeddings=False)
# shape -> (config, prompt tokens, answer tokens)
SHAPES = {"7b": (LLAMA_7B, 512, 512), "tiny": (TINY, 16, 16)}


@dataclass
class Setup:
    shape: str
    cfg: ModelConfig
    device: torch.device
    pairs: int
    prompt: int
    answer: int
    warmup: int
    iters: int
    triples: list = field(init=False, repr=False)  # (prompt, chosen, rejected) token ids of the pairs, random

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(1, self.cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731 (never 0)
        self.triples = [(ids(self.prompt), ids(self.answer), ids(self.answer)) for _ in range(self.pairs)]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32

    @property
    def seq(self) -> int:
        return self.prompt + self.answer

    @property
    def tokens(self) -> int:
        """Tokens through the policy per step: both sequences of every pair."""
        return 2 * self.pairs * self.seq

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def batch_note(self) -> str:
        return (f"{self.pairs} pairs x (prompt {self.prompt} + chosen {self.answer} / rejected {self.answer}) = "
                f"{2 * self.pairs} sequences of {self.seq}")


@dataclass
class Side:
    """One side of a figure: its measurement, its first step's loss, pairs per step."""
    measured: Measured
    first_loss: float
    pairs: int
    tokens: int

    @property
    def pairs_per_s(self) -> float:
        return self.measured.tokens_per_s * self.pairs / self.tokens

    def notes(self, side: str) -> dict:
        return {f"{side}_tokens_per_s": round(self.measured.tokens_per_s), **self.measured.notes(side),
                f"{side}_first_loss": round(self.first_loss, 4)}


def release(setup: Setup, what: str) -> None:
    """Free what the last side left (bench/gpu.py `free`) and say if anything stayed: it would count in the next
    side's peak."""
    if not setup.cuda:
        gc.collect()
        return
    free()
    left = torch.cuda.memory_allocated() / GiB
    if left > 0.01:
        print(f"# warning: {left:.3f} GiB still allocated after {what}", flush=True)


def timed(report: Report, setup: Setup, step) -> Measured:
    """bench/gpu.py `measure` on the GPU; on the CPU wall time only (a smoke run: no peak, clock or power)."""
    if setup.cuda:
        return measure(report, step, setup.tokens, warmup=setup.warmup, iters=setup.iters)
    for _ in range(setup.warmup):
        step()
    start = time.perf_counter()
    for _ in range(setup.iters):
        step()
    return Measured(setup.tokens * setup.iters / (time.perf_counter() - start), 0.0)


def first_step(step, named_params: list[tuple[str, torch.nn.Parameter]]) -> float:
    """One step; its loss. Raises unless every LoRA B moved (the step trains; A has no gradient while B is 0)."""
    before = {n: p.detach().to("cpu", copy=True) for n, p in named_params if "lora_B" in n}
    if not before:
        raise RuntimeError("no lora_B among the trainable weights")
    loss = float(step())
    still = [n for n, p in named_params if n in before and torch.equal(before[n], p.detach().cpu())]
    if still:
        raise RuntimeError(f"a step left {len(still)} of {len(before)} LoRA B weights as they were, e.g. {still[0]}")
    if not math.isfinite(loss):
        raise RuntimeError(f"the first step's loss is {loss}")
    return loss


def run_side(report: Report, setup: Setup, step, named_params) -> Side:
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = first_step(step, named_params)
    return Side(timed(report, setup, step), loss, setup.pairs, setup.tokens)


# ---- ours --------------------------------------------------------------------------------------------------------
def our_batch(setup: Setup) -> dict[str, torch.Tensor]:
    """The pairs as the loop gets them from `train.py dpo --max-seq-length SEQ --batch-size PAIRS`: a pair to a row of
    2 x SEQ positions, chosen then rejected side by side."""
    loader = PairLoader(PairExamples.build(setup.triples, {}), pad_id=0, max_seq_len=setup.seq, batch_size=setup.pairs)
    (batch,) = loader.eval_batches()
    assert len(batch["pair_ids"]) == len(batch["input_ids"]) == setup.pairs, "expected one pair to a row"
    return {k: v.to(setup.device) for k, v in batch.items()}


def ours(report: Report, setup: Setup, kind: str) -> tuple[Side, dict]:
    """Our DPO step; `kind`: eager (checkpointing), compiled (checkpointing, compiled blocks, offloading) or qlora
    (an NF4 base, eager, checkpointing). Returns the side and what it ran, in words."""
    release(setup, "the last side")
    model = build("ours", setup.cfg, setup.dtype, setup.device)
    if kind == "qlora":
        quantize_blocks(model)
        if setup.cuda:
            free()  # the bf16 weights quantized away
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.0, targets=TARGETS)  # dpo's default dropout: 0
    as_scorer(model).train()
    compiled = offload = kind == "compiled"
    per_block = compiled and compiles_per_block(model, offload)  # as trainer/loop.py decides it
    offloader = apply_activation_policy(model, ActivationPolicy(checkpointing=True, offload=offload,
                                                                compile_blocks=per_block))
    forward = torch.compile(model) if compiled and not per_block else model
    objective = DPOObjective(PreferenceLoss(BETA, "sigmoid"), base_reference)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0, fused=setup.cuda)
    batch = our_batch(setup)

    def step() -> torch.Tensor:
        with setup.autocast():
            loss, _ = objective(forward, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    side = run_side(report, setup, step, named)
    if offloader is not None:
        side.measured.host_gib = offloader.offloaded_bytes / GiB
    ran = {"eager": "eager, every block recomputed in the backward (--gradient-checkpointing)",
           "qlora": "NF4 base (--qlora), eager, every block recomputed in the backward",
           "compiled": ("--gradient-checkpointing --compile --offload-activations: "
                        + ("a compiled graph per decoder block and a compiled head" if per_block else
                           "the whole model compiled")
                        + f"; recomputed blocks save gate/up and offload to pinned host memory, the last "
                          f"{OFFLOAD_SKIP_LAST} on the GPU; the reference pass (no_grad) runs the compiled blocks too, "
                          "as in the trainer")}[kind]
    return side, {"ours_is": f"trainer/dpo.py DPOObjective (sigmoid, beta {BETA}), reference = the base with the "
                             f"adapters disabled (base_reference, as train.py dpo --lora); LoRA r={R} alpha {ALPHA} "
                             f"q,v, dropout 0; {ran}; fused AdamW"}


# ---- TRL -----------------------------------------------------------------------------------------------------------
def trl_tokenizer():
    """A word-level tokenizer (t0 .. t7, t0 the pad): TRL wants one for its dataset and pad id; the batch itself comes
    as token ids through its collator."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")


def trl(report: Report, setup: Setup) -> tuple[Side, dict]:
    """TRL's DPOTrainer + PEFT: compute_loss under its accelerator's autocast, backward, fused AdamW."""
    import datasets
    import peft
    import trl as trl_lib
    release(setup, "the last side")
    datasets.disable_progress_bars()
    model = build("hf", setup.cfg, setup.dtype, setup.device)
    # transformers 5.17 names it gradient_checkpointing; later versions activation_checkpointing (the old name an alias)
    name = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                if n in {f.name for f in dataclasses.fields(trl_lib.DPOConfig)})
    with tempfile.TemporaryDirectory() as tmp:
        args = trl_lib.DPOConfig(
            output_dir=tmp, report_to="none", use_cpu=not setup.cuda, bf16=setup.cuda, beta=BETA,
            loss_type=["sigmoid"], max_length=None, per_device_train_batch_size=setup.pairs, learning_rate=LR,
            save_strategy="no", **{name: True, f"{name}_kwargs": {"use_reentrant": False}})
        lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
        data = datasets.Dataset.from_dict({"prompt": ["t2 t3 "], "chosen": ["t4"], "rejected": ["t5"]})
        trainer = trl_lib.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data,
                                     processing_class=trl_tokenizer(), peft_config=lora)
        policy = trainer.model.train()
        # Trainer.train() turns checkpointing on (transformers 5.17: gradient_checkpointing_enable; later versions
        # activation_checkpointing_enable), not __init__: so here, with the kwargs that TRL's reference pass restores
        getattr(policy, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
        base = policy.get_base_model()
        if not getattr(base, f"is_{name}"):
            raise RuntimeError("TRL's policy runs without gradient checkpointing")
        inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                        for p, c, r in setup.triples])
        inputs = {k: v.to(setup.device) for k, v in inputs.items()}
        assert tuple(inputs["input_ids"].shape) == (2 * setup.pairs, setup.seq), inputs["input_ids"].shape
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        assert named and all("lora_" in n for n, _ in named), "PEFT trains the adapters only"
        opt = torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0, fused=setup.cuda)

        def step() -> torch.Tensor:
            trainer._metrics["train"].clear()  # what it logs each step; train() would empty it at each log
            with trainer.accelerator.autocast():
                loss = trainer.compute_loss(policy, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        side = run_side(report, setup, step, named)
        version = importlib.metadata.version("trl")
    return side, {"reference_is": f"TRL {version} DPOTrainer.compute_loss + PEFT LoraConfig(r={R}, alpha {ALPHA}, "
                                  f"dropout 0.05, zeroed by disable_dropout) q,v; ref_model None (the base with the "
                                  "adapters disabled); gradient checkpointing, use_reentrant False; "
                                  f"{'bf16 autocast' if setup.cuda else 'float32'}; eager; fused AdamW"}


# ---- figures -------------------------------------------------------------------------------------------------------
class Bench:
    """The sides measured so far (each once per run, shared by the figures that need it)."""

    def __init__(self, report: Report, setup: Setup):
        self.report, self.setup, self.sides = report, setup, {}
        self.prefix = f"dpo_{setup.shape}"

    def side(self, key: str) -> tuple[Side, dict]:
        if key not in self.sides:
            start = time.perf_counter()
            self.sides[key] = trl(self.report, self.setup) if key == "trl" else ours(self.report, self.setup, key)
            side = self.sides[key][0]
            print(f"# {key}: {side.pairs_per_s:.3f} pairs/s, {side.measured.tokens_per_s:.0f} tokens/s, peak "
                  f"{side.measured.peak_gib:.3f} GiB, first loss {side.first_loss:.4f} "
                  f"({time.perf_counter() - start:.0f} s with its setup)", flush=True)
        return self.sides[key]

    def against_trl(self, name: str, kind: str, **extra) -> None:
        (mine, ours_is), (ref, ref_is) = self.side(kind), self.side("trl")
        meets = (mine.pairs_per_s >= SPEEDUP_GOAL * ref.pairs_per_s
                 and mine.measured.peak_gib <= ref.measured.peak_gib) if self.setup.cuda else None
        self.report.add(name, mine.pairs_per_s, ref.pairs_per_s, "pairs/s", batch=self.setup.batch_note(),
                        **extra, **mine.notes("ours"), **ref.notes("ref"), **ours_is, **ref_is,
                        meets_goal=meets, goal=f">= {SPEEDUP_GOAL}x at no more peak memory")


def lora(bench: Bench) -> None:
    bench.against_trl(f"{bench.prefix}_lora_qv_r8", "eager", checkpointing=True)


def compiled(bench: Bench) -> None:
    eager = bench.sides.get("eager")
    extra = {} if eager is None else {
        "ours_vs_ours_eager": round(bench.side("compiled")[0].pairs_per_s / eager[0].pairs_per_s, 3)}
    bench.against_trl(f"{bench.prefix}_lora_qv_r8_compiled", "compiled",
                      checkpointing=f"recomputed blocks save gate/up and offload them to host memory, the last "
                                    f"{OFFLOAD_SKIP_LAST} on the GPU (ours); every block recomputed (TRL)", **extra)


def qlora(bench: Bench) -> None:
    (q, q_is), (bf16, _) = bench.side("qlora"), bench.side("eager")
    bench.report.add(f"{bench.prefix}_qlora_qv_r8", q.pairs_per_s, bf16.pairs_per_s, "pairs/s",
                     batch=bench.setup.batch_note(), checkpointing=True, **q.notes("ours"), **bf16.notes("ref"),
                     **q_is, reference_is="our bf16 LoRA DPO, eager (the dpo_*_lora_qv_r8 figure's ours)",
                     goal_peak_gib=PEAK_GOAL_QLORA_GIB,
                     meets_goal=q.measured.peak_gib < PEAK_GOAL_QLORA_GIB if bench.setup.cuda else None)


FIGURES = {"lora": lora, "compiled": compiled, "qlora": qlora}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(FIGURES),
                        help="figures to run (default: all; on the CPU lora and qlora, compiling takes a while there)")
    parser.add_argument("--shape", default="7b", choices=list(SHAPES), help="7b: Llama-7B; tiny: a CPU smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per step")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 512; tiny 16)")
    parser.add_argument("--answer", type=int, help="tokens of each answer (default 512; tiny 16)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the checked first one (GPU 2, CPU 1)")
    parser.add_argument("--iters", type=int, help="timed steps, the median taken on the GPU (GPU 5, CPU 2)")
    parser.add_argument("--out", default="bench", help="where results.json / results.md go")
    parser.add_argument("--commit", default="unknown", help="commit being measured")
    args = parser.parse_args(argv)
    cfg, prompt, answer = SHAPES[args.shape]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    setup = Setup(args.shape, cfg, device, args.pairs, args.prompt or prompt, args.answer or answer,
                  warmup=args.warmup if args.warmup is not None else 2 if cuda else 1,
                  iters=args.iters or (5 if cuda else 2))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(Path(args.out), args.commit)
    try:
        report.common["versions"]["trl"] = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        report.common["versions"]["trl"] = "absent"
    bench = Bench(report, setup)
    for name in args.only or (list(FIGURES) if cuda else ["lora", "qlora"]):
        start = time.perf_counter()
        try:
            FIGURES[name](bench)
        except Exception:  # one failing figure must not lose the others
            traceback.print_exc()
            report.add(f"{bench.prefix}_{name}_failed", 0.0, None, "error")
        print(f"# {name} took {time.perf_counter() - start:.0f} s", flush=True)
    if report.monitor is not None:
        report.monitor.close()
    return report.rows


if __name__ == "__main__":
    main()
