"""Every stage at its defaults against the tool a user would otherwise run, side by side in one process on one GPU
(issue 33): real instruction data from ../shared/corpora prepared here (`utils.prepare.prepare_corpora`), our stage
functions (trainer/stages.py) given only data, init / base, an output folder and a step limit, against TRL /
transformers at their documented defaults with their packing and padding-free options on.

    python bench/stages.py --only sft_small --records 10000 --commit $(git rev-parse --short HEAD) --out /tmp/stages
    python bench/stages.py --only generate_batch eval_cmmlu --commit ... --out /tmp/stages
    python bench/stages.py --only lora_7b_sft --records 10000 --commit ... --out /tmp/stages
    python bench/stages.py --only dpo_7b_lora --commit ... --out /tmp/stages
    python bench/stages.py --device cpu --preset tiny --records 200 --out /tmp/stages-smoke      # CPU smoke run

Data: the instruction corpora of `--corpora` (SFT_CORPORA: translational-style dialogues, medical dialogues, plain
dialogues, BELLE, MSRA NER instructions; about 25k records) prepared into prompt / response parquet shards, the
first `--records` training rows kept (the valid split cut to match). The tokenizer: `--tokenizer` (LLaMA's 32k
SentencePiece by default), saved with every model directory written here, so that transformers' AutoTokenizer and
our stages read the same vocabulary and the same chat template (the tokenizer's own: llama2 for LLaMA's).

Figures:
- `sft_small`: `trainer.stages.sft` (`train.py sft`) on a random-init `--preset` model (a model directory, --init)
  against TRL `SFTTrainer` on `transformers.LlamaForCausalLM` loaded from that directory, the records as
  conversational prompt-completion ([user], [assistant]: TRL learns the completion only, as our SFT learns the
  answer), `packing=True` (its default strategy, best-fit decreasing) and `padding_free=True`, TRL's other settings
  at their defaults (batch 8 x `max_length` 1024 flattened, gradient checkpointing on, bf16, lr 2e-5), no checkpoint
  saved while timed. Tokens/s counts tokens of the data: ours the logged positions x (1 - the packer's padding
  share), TRL its own count (`num_tokens`: every position of a padding-free batch). MFU: 6N + attention at each side's
  row length (trainer/loop.py `flops_per_token`); peak: torch's peak allocated memory. Goal >= 1.5x.
- `lora_7b_sft`: `trainer.stages.lora` (`train.py lora`) on the Llama-7B shape (random bf16 weights written once as
  a model directory, the write timed) against TRL `SFTTrainer` + PEFT (`LoraConfig(task_type="CAUSAL_LM")`: r 8,
  alpha 8, dropout 0, q_proj / v_proj) on the same directory, loaded in its bf16; the same data. Goal >= 1.5x at no
  more peak memory.
- `dpo_7b_lora`: bench/dpo.py's figures (`--dpo-only`, default `lora compiled`), rows taken over as they are.
- `eval_cmmlu`: bench/eval_knowledge.py (CMMLU scoring against a plain transformers loop), rows taken over (GPU only).
- `generate_batch`: `--gen-prompts` BELLE eval questions (64) x `--gen-tokens` new tokens (256), greedy, in one
  batch: our eval's answer generation (`model.generation.generate_answers` at its defaults, as `train.py eval` and
  the training samples call it) against transformers `generate` with `cache_implementation="static"` (which
  compiles its decoding forward on a GPU by itself); the same prompt ids, left-padded; the stop id is one no model
  emits, so that both sides write every token (transformers: `min_new_tokens`). Ours with the static, compiled decode
  step (`generate(static=True, compile=True)`) is noted beside. Goal >= 3x.

Ours is timed from the run's train.log: the median tokens/s of the logged windows (every `log_every` = 10 steps)
after the first, which holds torch.compile and the first steps; its peak memory is the log's last reading, its batch
the plan it printed. TRL is timed by a TrainerCallback: `--ref-warmup` optimizer steps, then `--ref-seconds` of steps
(synchronized at each step's end), its peak memory from the start of `train()`. TRL runs first, then ours, each after
the other's memory is released (what is left is said, and would count against ours). Writes DIR/results.json and
DIR/results.md as bench/gpu.py does (the rows of dpo_7b_lora and eval_cmmlu after their own scripts' runs under
DIR/dpo and DIR/eval_cmmlu).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from gpu import LLAMA_7B, GiB, Report, build, free  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402
from model.checkpoint import save_model  # noqa: E402
from model.generation import SamplingConfig, chat_prompt, context_budget, generate, generate_answers  # noqa: E402
from trainer.loop import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402
from utils.prepare import PrepareConfig, prepare_corpora  # noqa: E402
from utils.templates import get_template  # noqa: E402
from utils.tokenizer import Tokenizer  # noqa: E402

SPEEDUP_GOAL, GENERATE_GOAL = 1.5, 3.0
# (format, path under --corpora): the instruction corpora of ../shared/corpora (MANIFEST.md)
SFT_CORPORA = (("alpaca", "translational_style/TslDial.json"), ("medical", "medical_dialogue"),
               ("qa", "translational_style/2_Dialogues.first6000.jsonl"), ("belle", "belle/dev1K.first800.json"),
               ("instruct", "msra_ner_instruct"))
GENERATE_PROMPTS = "belle/eval_set.json"  # {"question", "std_answer", "class"} lines
LOG_LINE = re.compile(r"step (\d+) loss \S+ lr \S+ ([\d,.]+) tok/s(?: MFU ([\d.]+)%)?(?: peak ([\d.]+) GiB)?")


def first_existing(*paths: Path) -> Path:
    return next((p for p in paths if p.exists()), paths[-1])


# ---- what a run of ours logged --------------------------------------------------------------------------------------
@dataclass
class Window:
    step: int
    tokens_per_s: float
    mfu: float | None
    peak_gib: float | None


def parse_log(text: str) -> list[Window]:
    """The throughput windows of a train.log (trainer/loop.py `_read_step`'s lines), in order."""
    return [Window(int(m[1]), float(m[2].replace(",", "")), None if m[3] is None else float(m[3]) / 100,
                   None if m[4] is None else float(m[4])) for m in LOG_LINE.finditer(text)]


def steady(windows: list[Window]) -> list[Window]:
    """The windows after the first (which holds compilation and the first steps); the only one when there is one."""
    if not windows:
        raise ValueError("the run logged no throughput window")
    return windows[1:] or windows


@dataclass
class OurRun:
    """A stage run of ours, read back from its run directory."""
    windows: list[Window]
    batch: dict
    packing: dict
    seconds: float
    compile_note: str | None

    @property
    def positions_per_s(self) -> float:
        return statistics.median(w.tokens_per_s for w in steady(self.windows))

    @property
    def pad_fraction(self) -> float:
        return float(self.packing.get("pad_fraction", 0.0))

    @property
    def tokens_per_s(self) -> float:
        """Tokens of the data per second: the logged positions less the packer's padding share."""
        return self.positions_per_s * (1 - self.pad_fraction)

    @property
    def peak_gib(self) -> float | None:
        peaks = [w.peak_gib for w in self.windows if w.peak_gib is not None]
        return max(peaks) if peaks else None

    def notes(self) -> dict:
        logged_mfu = [w.mfu for w in steady(self.windows) if w.mfu is not None]
        return {"ours_positions_per_s": round(self.positions_per_s), "ours_pad_fraction": round(self.pad_fraction, 4),
                "ours_windows_tokens_per_s": [round(w.tokens_per_s) for w in self.windows],
                "ours_logged_mfu": round(statistics.median(logged_mfu), 3) if logged_mfu else None,
                "ours_peak_gib": None if self.peak_gib is None else round(self.peak_gib, 3),
                "ours_batch": {k: self.batch.get(k) for k in ("rows", "grad_accum", "row_tokens", "reason")},
                "ours_first_step": self.compile_note, "ours_run_s": round(self.seconds, 1)}


def read_run(out_dir: Path, seconds: float) -> OurRun:
    log = (out_dir / "train.log").read_text(encoding="utf-8")
    state = json.loads((out_dir / "latest" / "training_state" / "trainer_state.json").read_text(encoding="utf-8"))
    compiled = re.search(r"compiled: the first step took ([\d.]+) s", log)
    return OurRun(parse_log(log), state.get("batch", {}), state.get("run", {}).get("packing", {}), seconds,
                  None if compiled is None else f"{compiled[1]} s (compiling)")


def run_stage(stage, cfg) -> OurRun:
    """A stage function of trainer/stages.py run to its step limit, then read back."""
    reset_accelerate()
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    start = time.perf_counter()
    stage(cfg)
    run = read_run(Path(cfg.out_dir), time.perf_counter() - start)
    reset_accelerate()
    return run


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each side builds its own Accelerator from a clean one."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def release(cuda: bool, what: str) -> None:
    """Drop what the last side left (compiled graphs included) and say what stayed: it would count against the next
    side's peak."""
    torch._dynamo.reset()
    free()
    if cuda and torch.cuda.memory_allocated() > 0.01 * GiB:
        print(f"# warning: {torch.cuda.memory_allocated() / GiB:.3f} GiB still allocated after {what}", flush=True)


# ---- TRL -------------------------------------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> a dict of Python literals where they parse (numbers, True / False / None), else strings."""
    import ast
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{pair!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


@dataclass
class RefRun:
    tokens_per_s: float
    peak_gib: float | None
    steps: int
    seconds: float
    setup_s: float
    settings: dict


def step_clock(trainer, warmup: int, seconds: float, cuda: bool):
    """A TrainerCallback timing `trainer` after `warmup` optimizer steps for `seconds` (then it stops the run): the
    tokens TRL counted (`_total_train_tokens`, its logged num_tokens) over the wall time between step ends."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = end = None

        def mark(self, state):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter(), trainer._total_train_tokens, state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < warmup or self.end is not None:
                return
            now = self.mark(state)
            if self.start is None:
                self.start = now
            elif now[0] - self.start[0] >= seconds or state.global_step >= state.max_steps:
                self.end = now
                control.should_training_stop = True

    return StepClock()


def trl_sft(args, device: torch.device, model_dir: Path, train_file: Path, work: Path, peft: bool) -> RefRun:
    """TRL's SFTTrainer (+ PEFT's LoraConfig defaults with `peft`) on the model directory, the prepared records as
    conversational prompt-completion, packing and padding-free on, its other settings at their defaults (`--trl`
    overrides aside)."""
    import datasets
    import transformers
    import trl
    cuda = device.type == "cuda"
    datasets.disable_progress_bars()
    start = time.perf_counter()
    dtype = torch.float32 if not cuda else "auto"  # the directory's own dtype (float32 small, bf16 7B)
    place = torch.cuda.current_device() if cuda else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": place})
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = datasets.load_dataset("parquet", data_files=str(train_file), split="train", cache_dir=str(work / "hf"))
    data = data.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["response"]}]},
                    remove_columns=data.column_names)
    settings = dict(packing=True, padding_free=True, max_steps=args.ref_max_steps, save_strategy="no",
                    report_to="none", disable_tqdm=True, use_cpu=not cuda, bf16=cuda)
    settings |= parse_overrides(args.trl)
    config = trl.SFTConfig(output_dir=str(work / "trl"), **settings)
    peft_config = None
    if peft:
        import peft as peft_lib
        peft_config = peft_lib.LoraConfig(task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    clock = step_clock(trainer, args.ref_warmup, args.ref_seconds, cuda)
    trainer.add_callback(clock)
    setup = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else None
    if clock.start is None or clock.end is None or clock.end[1] <= clock.start[1]:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} steps: too few to time after {args.ref_warmup} "
                           f"warm-up steps (--ref-max-steps {args.ref_max_steps})")
    seconds, tokens, steps = (b - a for a, b in zip(clock.start, clock.end))
    used = {"attn_implementation": model.config._attn_implementation,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps, "max_length": config.max_length,
            "packing_strategy": config.packing_strategy, "gradient_checkpointing": config.gradient_checkpointing,
            "learning_rate": config.learning_rate, "bf16": config.bf16, "torch_compile": config.torch_compile,
            "completion_only_loss": trainer.completion_only_loss, "padding_free": trainer.padding_free,
            "overrides": parse_overrides(args.trl)}
    if peft:
        lora = trainer.model.peft_config["default"]
        used["lora"] = {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                        "targets": sorted(lora.target_modules)}
    del trainer, model, data
    return RefRun(tokens / seconds, peak, steps, seconds, setup, used)


# ---- the bench -------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, report: Report, work: Path):
        self.args, self.report, self.work = args, report, work
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tokenizer = Tokenizer.load(args.tokenizer)
        self._data: Path | None = None
        self.peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in report.device), None)

    def config(self, shape: str) -> ModelConfig:
        """A shape (`7b` or a preset) with the tokenizer's vocabulary and special ids; room for TRL's 1024-token
        rows."""
        tok = self.tokenizer
        base = LLAMA_7B if shape == "7b" else ModelConfig.preset(shape)
        return dataclasses.replace(base, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                   bos_token_id=tok.bos_id,
                                   max_position_embeddings=max(base.max_position_embeddings, 1024))

    def data(self) -> Path:
        """The SFT data directory (train / valid shards), prepared once per run."""
        if self._data is None:
            start = time.perf_counter()
            prepared = self.work / "prepared"
            corpora = [(fmt, self.args.corpora / rel) for fmt, rel in SFT_CORPORA]
            stats = prepare_corpora(corpora, prepared, PrepareConfig(overwrite=True))
            self._data = subset(prepared, self.work / "sft", self.args.records)
            rows = {s: rows_in(self._data, s) for s in ("train", "valid")}
            print(f"# data: {stats['total']['kept']:,} records prepared, {rows} kept, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        return self._data

    def model_dir(self, shape: str, dtype: torch.dtype) -> tuple[Path, float]:
        """A random-init model of the shape saved with the tokenizer; the seconds building and writing took."""
        out = self.work / f"model_{shape}"
        start = time.perf_counter()
        model = build("ours", self.config(shape), dtype, self.device)
        save_model(model, out, tokenizer=self.tokenizer)
        del model
        release(self.cuda, f"writing {out.name}")
        return out, time.perf_counter() - start

    def mfu(self, cfg: ModelConfig, tokens_per_s: float, row_tokens: int) -> float | None:
        if self.peak_flops is None:
            return None
        with torch.device("meta"):
            fpt = flops_per_token(Transformer(cfg), row_tokens)
        return round(tokens_per_s * fpt / self.peak_flops, 3)

    def ours_common(self, name: str) -> dict:
        return {"out_dir": str(self.work / "runs" / name), "max_steps": self.args.steps_for(name),
                "cpu": not self.cuda, **parse_overrides(self.args.ours)}


def rows_in(data_dir: Path, split: str) -> int:
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(data_dir.glob(f"{split}-*.parquet")))


def subset(prepared: Path, out: Path, records: int | None) -> Path:
    """The prepared train split's first `records` rows (all with None) and its valid split cut to a twentieth of that
    (at least 16 rows), as one shard each in `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for split in ("train", "valid"):
        table = pa.concat_tables(pq.read_table(f) for f in sorted(prepared.glob(f"{split}-*.parquet")))
        keep = records if split == "train" else None if records is None else max(16, records // 20)
        pq.write_table(table if keep is None else table.slice(0, keep), out / f"{split}-00000.parquet")
    return out


def against(bench: Bench, name: str, ours: OurRun, ref: RefRun, cfg: ModelConfig, ours_is: str, reference_is: str,
            memory_goal: bool, **extra) -> None:
    ratio = ours.tokens_per_s / ref.tokens_per_s
    meets = None
    if bench.cuda:
        meets = ratio >= SPEEDUP_GOAL and (not memory_goal or (ours.peak_gib or math.inf) <= (ref.peak_gib or 0))
    row_tokens = int(ours.batch.get("row_tokens") or 0)
    bench.report.add(name, ours.tokens_per_s, ref.tokens_per_s, "tokens/s",
                     ours_mfu=bench.mfu(cfg, ours.tokens_per_s, row_tokens) if row_tokens else None,
                     ref_mfu=bench.mfu(cfg, ref.tokens_per_s, ref.settings["max_length"] or row_tokens or 1),
                     **ours.notes(), ref_peak_gib=None if ref.peak_gib is None else round(ref.peak_gib, 3),
                     ref_timed_steps=ref.steps, ref_timed_s=round(ref.seconds, 1), ref_setup_s=round(ref.setup_s, 1),
                     ref_settings=ref.settings, ours_is=ours_is, reference_is=reference_is, **extra,
                     goal=f">= {SPEEDUP_GOAL}x" + (" at no more peak memory" if memory_goal else ""),
                     meets_goal=meets)


# ---- figures -------------------------------------------------------------------------------------------------------
def sft_small(bench: Bench) -> None:
    from trainer.stages import SFTConfig, sft
    args = bench.args
    data = bench.data()
    model_dir, _ = bench.model_dir(args.preset, torch.float32)
    ref = trl_sft(args, bench.device, model_dir, data / "train-00000.parquet", bench.work, peft=False)
    release(bench.cuda, "TRL")
    ours = run_stage(sft, SFTConfig(init=str(model_dir), data=str(data), **bench.ours_common("sft")))
    release(bench.cuda, "our sft")
    version = version_of("trl")
    against(bench, f"sft_{args.preset}", ours, ref, bench.config(args.preset),
            ours_is="trainer.stages.sft at its defaults (train.py sft --init DIR --data DIR --max-steps N)",
            reference_is=f"TRL {version} SFTTrainer, packing (bfd) + padding_free, conversational prompt-completion, "
                         "otherwise its defaults; transformers LlamaForCausalLM from the same directory",
            memory_goal=False, records=rows_in(data, "train"))


def lora_7b_sft(bench: Bench) -> None:
    from trainer.stages import LoraConfig, lora
    args = bench.args
    data = bench.data()
    shape = args.lora_shape
    base_dir, write_s = bench.model_dir(shape, torch.bfloat16 if bench.cuda else torch.float32)
    print(f"# {base_dir.name}: built and written in {write_s:.1f} s", flush=True)
    train_file = data / "train-00000.parquet"
    ref = trl_sft(args, bench.device, base_dir, train_file, bench.work, peft=True)
    release(bench.cuda, "TRL + PEFT")
    ours = run_stage(lora, LoraConfig(base=str(base_dir), data=str(train_file), format="parquet",
                                      **bench.ours_common("lora")))
    release(bench.cuda, "our lora")
    shutil.rmtree(base_dir, ignore_errors=True)
    version = version_of("trl")
    against(bench, f"lora_{shape}_sft", ours, ref, bench.config(shape),
            ours_is="trainer.stages.lora at its defaults (train.py lora --base DIR --data FILE --format parquet "
                    "--max-steps N): r 8, alpha 16, dropout 0.05, q_proj,v_proj, rows of 2048",
            reference_is=f"TRL {version} SFTTrainer + PEFT LoraConfig(task_type=CAUSAL_LM) defaults, packing (bfd) "
                         "+ padding_free, conversational prompt-completion, otherwise its defaults; "
                         "LlamaForCausalLM from the same directory",
            memory_goal=True, records=rows_in(data, "train"), base_write_s=round(write_s, 1))


def adopt(bench: Bench, rows: list[dict], source: str) -> None:
    """Rows another bench script wrote, added to this report as they are (this run's device, commit, date)."""
    skip = {"name", "ours", "reference", "ratio", "unit", "device", "commit", "date", "versions"}
    for row in rows:
        bench.report.add(row["name"], row["ours"], row["reference"], row["unit"], source=source,
                         **{k: v for k, v in row.items() if k not in skip})


def dpo_7b_lora(bench: Bench) -> None:
    import dpo
    out = bench.args.out / "dpo"
    argv = ["--out", str(out), "--commit", bench.args.commit, "--only", *bench.args.dpo_only]
    if not bench.cuda:
        argv += ["--shape", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1"]
    adopt(bench, dpo.main(argv), "bench/dpo.py")


def eval_cmmlu(bench: Bench) -> None:
    if not bench.cuda:
        print("# eval_cmmlu: bench/eval_knowledge.py needs CUDA; skipped", flush=True)
        return
    import eval_knowledge
    out = bench.args.out / "eval_cmmlu"
    argv = ["eval_knowledge.py", "--data", str(bench.args.cmmlu), "--tokenizer", str(bench.args.tokenizer),
            "--out", str(out), "--commit", bench.args.commit, "--shapes", *bench.args.cmmlu_shapes]
    reports = []

    class Kept(Report):  # its nvidia-smi sampler, closed after its run (its main leaves it running)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            reports.append(self)

    saved = sys.argv, eval_knowledge.Report
    sys.argv, eval_knowledge.Report = argv, Kept
    try:
        eval_knowledge.main()
    finally:
        sys.argv, eval_knowledge.Report = saved
        for report in reports:
            report.monitor.close()
    adopt(bench, json.loads((out / "results.json").read_text(encoding="utf-8")), "bench/eval_knowledge.py")


def generation_prompts(bench: Bench, cfg: ModelConfig, count: int, new_tokens: int) -> list[list[dict]]:
    """The first `count` BELLE eval questions whose chat prompt leaves room for `new_tokens` and takes at most 256
    tokens (so that the batch is about answers, not one long prompt), as conversations."""
    template = get_template(bench.tokenizer.default_template)
    budget = min(256, cfg.max_position_embeddings - new_tokens)
    found = []
    for line in (bench.args.corpora / GENERATE_PROMPTS).read_text(encoding="utf-8").splitlines():
        messages = [{"role": "user", "content": json.loads(line)["question"]}]
        with contextlib.suppress(ValueError):  # too long
            chat_prompt(bench.tokenizer, messages, template, budget)
            found.append(messages)
        if len(found) == count:
            return found
    raise ValueError(f"only {len(found)} BELLE eval questions fit {budget} prompt tokens, {count} wanted")


def timed(fn, cuda: bool, warmup: int, iters: int) -> tuple[float, float | None]:
    """Median seconds of `fn` after `warmup` calls; the peak memory of the timed calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / GiB if cuda else None


def ours_generation(bench: Bench, cfg: ModelConfig, conversations: list[list[dict]], sampling: SamplingConfig,
                    dtype: torch.dtype) -> tuple[dict, list[list[int]]]:
    """Our sides of generate_batch, timed: the eval's path at its defaults, and on a GPU the static compiled step;
    and the prompt ids."""
    tok, cuda, iters = bench.tokenizer, bench.cuda, bench.args.gen_iters
    n, new = len(conversations), sampling.max_new_tokens
    template = get_template(tok.default_template)
    model = build("ours", cfg, dtype, bench.device).eval()
    ids = [chat_prompt(tok, c, template, context_budget(model, sampling)) for c in conversations]

    def default():
        _, tokens = generate_answers(model, tok, conversations, template, sampling, batch_size=n)
        assert tokens == n * new, (tokens, n * new)

    def compiled():
        out = generate(model, ids, sampling, pad_id=tok.pad_id, static=True, compile=True)
        assert sum(map(len, out)) == n * new

    sides = {"ours": timed(default, cuda, 1, iters)}
    if cuda:  # beside the default path
        sides["ours_compiled"] = timed(compiled, cuda, 1, iters)
    return sides, ids


def hf_generation(bench: Bench, cfg: ModelConfig, ids: list[list[int]], new: int, dtype: torch.dtype):
    """transformers' side of generate_batch, timed: `generate` with its static cache, the same left-padded ids."""
    tok = bench.tokenizer
    hf = build("hf", cfg, dtype, bench.device).eval()
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in ids], device=bench.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=bench.device)

    def run():
        with torch.inference_mode():
            out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, cache_implementation="static", pad_token_id=tok.pad_id,
                              eos_token_id=tok.eos_id)
        assert out.shape == (len(ids), width + new), out.shape
        for row in out[:, width:].tolist():
            tok.decode(row, skip_special_tokens=True, errors="ignore")

    return timed(run, bench.cuda, 1, bench.args.gen_iters)


def generate_batch(bench: Bench) -> None:
    args, cuda = bench.args, bench.cuda
    cfg = bench.config(args.preset)
    n, new = args.gen_prompts, args.gen_tokens
    conversations = generation_prompts(bench, cfg, n, new)
    # a stop id outside the vocabulary: every answer runs to `new` tokens, as transformers' with min_new_tokens
    sampling = SamplingConfig(max_new_tokens=new, stop_ids=(cfg.vocab_size,))
    dtype = torch.bfloat16 if cuda else torch.float32
    release(cuda, "the last figure")
    sides, ids = ours_generation(bench, cfg, conversations, sampling, dtype)
    release(cuda, "ours")
    sides["hf"] = hf_generation(bench, cfg, ids, new, dtype)
    release(cuda, "transformers")
    rate = {k: n * new / s for k, (s, _) in sides.items()}
    peaks = {f"{k}_peak_gib": None if p is None else round(p, 3) for k, (_, p) in sides.items()}
    compiled = rate.get("ours_compiled")
    bench.report.add(f"generate_batch_{args.preset}", rate["ours"], rate["hf"], "tokens/s",
                     prompts=n, new_tokens=new, prompt_tokens=f"{min(map(len, ids))}-{max(map(len, ids))}",
                     greedy=True, ours_compiled_tokens_per_s=None if compiled is None else round(compiled),
                     ours_compiled_ratio=None if compiled is None else round(compiled / rate["hf"], 3), **peaks,
                     iters=args.gen_iters,
                     ours_is="model.generation.generate_answers at its defaults (the eval's answer generation), "
                             "one batch of all prompts",
                     reference_is="transformers generate, cache_implementation='static' (auto-compiled on a GPU), "
                                  "greedy, min_new_tokens = max_new_tokens, left-padded",
                     goal=f">= {GENERATE_GOAL}x",
                     meets_goal=rate["ours"] >= GENERATE_GOAL * rate["hf"] if cuda else None)


FIGURES = {"sft_small": sft_small, "lora_7b_sft": lora_7b_sft, "dpo_7b_lora": dpo_7b_lora,
           "eval_cmmlu": eval_cmmlu, "generate_batch": generate_batch}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    corpora = first_existing(REPO / ".carry" / "corpora", REPO.parent / "shared" / "corpora")
    cmmlu = first_existing(REPO / ".carry" / "eval" / "cmmlu", REPO.parent / "shared" / "eval" / "cmmlu")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(FIGURES),
                        help="figures to run (default: all on a GPU; sft_small and generate_batch on the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small", help="the shape of sft_* and generate_batch_*")
    parser.add_argument("--lora-shape", default="7b", help="7b (Llama-7B) or a preset")
    parser.add_argument("--corpora", type=Path, default=corpora, help="../shared/corpora or a copy of it")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default CORPORA/tokenizers/llama)")
    parser.add_argument("--records", type=int, help="training records kept of those prepared (default: all)")
    parser.add_argument("--sft-steps", type=int, help="our sft's --max-steps (GPU 300, CPU 3)")
    parser.add_argument("--lora-steps", type=int, help="our lora's --max-steps (GPU 30, CPU 2)")
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="our stage config overrides (smoke runs: max_seq_length=128 batch_size=2)")
    parser.add_argument("--trl", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SFTConfig overrides (default: none beyond packing and padding_free)")
    parser.add_argument("--ref-warmup", type=int, help="TRL steps before its clock starts (GPU 10, CPU 1)")
    parser.add_argument("--ref-seconds", type=float, help="TRL's timed wall time (GPU 75, CPU 1)")
    parser.add_argument("--ref-max-steps", type=int, help="TRL's max_steps, a cap (GPU 100000, CPU 3)")
    parser.add_argument("--gen-prompts", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--gen-iters", type=int, help="timed generations per side, the median taken (GPU 3, CPU 1)")
    parser.add_argument("--dpo-only", nargs="*", help="bench/dpo.py --only (GPU: lora compiled; CPU: lora)")
    parser.add_argument("--cmmlu", type=Path, default=cmmlu, help="CMMLU directory for eval_cmmlu")
    parser.add_argument("--cmmlu-shapes", nargs="*", default=["small", "llama7b"])
    parser.add_argument("--work", type=Path, help="where data, models and runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where results.json / results.md go")
    parser.add_argument("--commit", default="unknown", help="commit being measured")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    defaults = dict(sft_steps=(300, 3), lora_steps=(30, 2), ref_warmup=(10, 1), ref_seconds=(75.0, 1.0),
                    ref_max_steps=(100_000, 3), gen_iters=(3, 1))
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    args.dpo_only = args.dpo_only or (["lora", "compiled"] if cuda else ["lora"])
    args.tokenizer = args.tokenizer or args.corpora / "tokenizers" / "llama"
    args.only = args.only or (list(FIGURES) if cuda else ["sft_small", "generate_batch"])
    args.steps_for = lambda stage: args.sft_steps if stage == "sft" else args.lora_steps
    return args


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@contextlib.contextmanager
def figure(report: Report, name: str):
    """Runs a figure's body; a failure is printed and written as a NAME_failed row, and the next figure runs."""
    start = time.perf_counter()
    try:
        yield
    except Exception:  # one failing figure must not lose the others
        traceback.print_exc()
        report.add(f"{name}_failed", 0.0, None, "error")
    gc.collect()
    print(f"# {name} took {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
    report = Report(args.out, args.commit)
    report.common["versions"] |= {name: version_of(name) for name in ("trl", "datasets", "accelerate")}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stages-")))
        bench = Bench(args, report, work)
        for name in args.only:
            with figure(report, name):
                FIGURES[name](bench)
    if report.monitor is not None:
        report.monitor.close()
    return report.rows


if __name__ == "__main__":
    main()
