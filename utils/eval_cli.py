"""`train.py eval`: its options and the run (loading the data and the model, the report). The metrics are
utils/metrics.py's (the definitions are its docstring), the knowledge benchmarks utils/knowledge.py's; both are
imported only when the command runs, so `train.py eval --help` starts without torch."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from model.config import DTYPE_NAMES
from utils.io import write_json
from utils.templates import TEMPLATES

TASKS = ("qa", "bpc", "cmmlu", "ceval", "gaokao")
KNOWLEDGE_TASKS = ("cmmlu", "ceval", "gaokao")


def add_arguments(parser: argparse.ArgumentParser, command: str = "eval") -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--lora", default=None, help="LoRA adapter directory (ours or PEFT's) applied to --model")
    parser.add_argument("--qlora", action="store_true",
                        help="load the base's block linears as NF4 (a QLoRA base), with or without --lora")
    parser.add_argument("--task", default="qa", choices=TASKS,
                        help="qa: answer loss, bits/char, BLEU-4, ROUGE-L on prompt/response records; bpc: bits per "
                             "character of the records as pretraining documents; cmmlu, ceval, gaokao: the knowledge "
                             "benchmarks (multiple choice; docs/eval.md)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="qa / bpc: parquet file(s) with prompt/response columns, or a prepared directory (its "
                             "--split; default data/corpus); cmmlu / ceval / gaokao: the benchmark's directory as it "
                             "ships (e.g. ../shared/eval/cmmlu)")
    parser.add_argument("--split", default=None,
                        help="qa / bpc: split of a prepared directory, test (default), valid or train; cmmlu: test "
                             "(default) or dev; ceval: val (default) or dev (its test split has no answers)")
    parser.add_argument("--max-samples", type=int, default=None, help="qa / bpc: evaluate only the first N records")
    parser.add_argument("--template", default=None, choices=[*sorted(TEMPLATES), "default", "none"],
                        help="chat template; qa: unset or 'default' = the tokenizer's own; benchmarks: unset or "
                             "'none' = the benchmark's plain prompt (base models), 'default' = the tokenizer's own "
                             "template, or a name (chat models)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="qa: prompts generated together (left-padded); benchmarks: prompts (loglik: options) "
                             "scored per forward")
    parser.add_argument("--loss-batch-tokens", type=int, default=8192,
                        help="qa / bpc: padded positions per loss batch (examples sorted by length)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face repetition penalty")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                        help="generate answers for BLEU-4 / ROUGE-L (--no-generate: loss metrics only)")
    parser.add_argument("--samples", type=int, default=5, help="(prompt, reference, prediction) triples reported")
    parser.add_argument("--shots", type=int, default=0,
                        help="benchmarks: K-shot prompts from the same subject's dev split (as the official scripts)")
    parser.add_argument("--method", nargs="+", default=["letter"], choices=["letter", "loglik"],
                        help="benchmarks: letter = next-token log-probability of A/B/C/D after the prompt (the "
                             "official scripts); loglik = option-text log-likelihood, reported as loglik (summed, "
                             "lm-eval acc) and loglik_norm (per character, lm-eval acc_norm); several run in turn")
    parser.add_argument("--subjects", nargs="+", default=None, help="benchmarks: only these subjects (file names)")
    parser.add_argument("--limit", type=int, default=None,
                        help="benchmarks: at most N questions, taken round-robin over the subjects")
    parser.add_argument("--predictions", default=None,
                        help="benchmarks: write every question's answer, predictions and option scores (JSON lines)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="weights dtype; auto = bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    parser.add_argument("--out", default=None,
                        help="JSON report path; unset = MODEL/eval-NAME.json (NAME: the split or the file's stem; "
                             "eval-bpc-NAME.json, eval-TASK-SPLIT.json for the other tasks); '-' = print it instead")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def default_out(model: str | Path, data: Sequence[str | Path], split: str) -> Path:
    items = [Path(d) for d in data]
    name = split if len(items) > 1 or items[0].is_dir() else items[0].stem
    return Path(model) / f"eval-{name}.json"


def _load(args: argparse.Namespace):
    from model.chat import load_chat_model

    return load_chat_model(args.model, args.lora, args.qlora, args.device, args.dtype)


def _emit(result: dict[str, Any], args: argparse.Namespace, out: Path, err: Console) -> None:
    import json

    if args.out == "-":
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    err.print(f"saved {out}")


def main(args: argparse.Namespace) -> None:
    from model.generation import SamplingConfig, context_budget
    from utils.metrics import data_files, document_bits_per_char, evaluate, load_records, print_report

    err = Console(stderr=True)
    if args.task in KNOWLEDGE_TASKS:
        return knowledge_main(args, err)
    data = args.data or ["data/corpus"]
    split = args.split or "test"
    try:
        if args.template == "none":
            raise ValueError("--template none (the benchmarks' plain prompt) is for --task cmmlu, ceval or gaokao")
        files = data_files(data, split)
        records, nulls = load_records(files, args.max_samples)
        if not records:
            raise ValueError(f"no (prompt, response) records in {', '.join(map(str, files))}")
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed)
        model, tokenizer = _load(args)
        if args.task == "qa" and args.generate:
            context_budget(model, sampling)  # --max-new-tokens must fit: fail now, not after the loss pass
    except (OSError, ValueError, KeyError) as e:
        err.print(f"[red]error:[/] {e}")
        raise SystemExit(2) from None
    result = {"model": str(args.model), "data": [str(f) for f in files], "skipped_null": nulls,
              "device": str(model.model.embed_tokens.weight.device),
              "dtype": str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")}
    if args.lora:
        result["lora"] = str(args.lora)
    # with --out -, stdout carries only the JSON (progress bars, including tokenize_sft's, go to stderr)
    with contextlib.redirect_stdout(sys.stderr) if args.out == "-" else contextlib.nullcontext():
        if args.task == "bpc":
            result = {"task": "bpc", **result, **document_bits_per_char(model, tokenizer, records,
                                                                          args.loss_batch_tokens, args.progress)}
        else:
            template = None if args.template == "default" else args.template
            result |= evaluate(model, tokenizer, records, template, sampling, args.batch_size,
                               args.loss_batch_tokens, args.generate, args.samples, args.progress)
    result.pop("predictions", None)
    print_report(result, Console(stderr=args.out == "-"))
    out = Path(args.out) if args.out and args.out != "-" else default_out(args.model, data, split)
    if args.task == "bpc" and not args.out:
        out = out.with_name("eval-bpc-" + out.name.removeprefix("eval-"))
    _emit(result, args, out, err)


def knowledge_main(args: argparse.Namespace, err: Console) -> None:
    """`train.py eval --task cmmlu|ceval|gaokao`: load the questions (a bad file fails before the model loads), score
    them with each --method, print a table per method, write the JSON report and the optional predictions."""
    from utils import knowledge

    if not args.data or len(args.data) != 1:
        raise ValueError(f"--task {args.task}: give the benchmark's directory as --data (one path), e.g. "
                         "--data ../shared/eval/cmmlu")
    split = args.split or knowledge.BENCHMARKS[args.task].default_split
    methods = [n for m in args.method for n in (["loglik", "loglik_norm"] if m == "loglik" else [m])]
    questions = knowledge.load_questions(args.task, args.data[0], split, args.subjects, args.limit, args.shots)
    model, tokenizer = _load(args)
    template = None if args.template in (None, "none") else args.template
    with contextlib.redirect_stdout(sys.stderr) if args.out == "-" else contextlib.nullcontext():
        results = knowledge.score_methods(model, tokenizer, questions, methods, template, args.batch_size,
                                          args.progress)
    for r in results.values():
        r.split = split
        r.info |= {f"skipped_{k}": v for k, v in questions.skipped.items()}
    knowledge.print_results(results, Console(stderr=args.out == "-"))
    p = model.model.embed_tokens.weight
    result = {"model": str(args.model), **({"lora": str(args.lora)} if args.lora else {}), "task": args.task,
              "data": str(args.data[0]), "split": split, "shots": args.shots,
              "template": next(iter(results.values())).info["template"], "questions": len(questions),
              "subjects_filter": args.subjects, "limit": args.limit, "device": str(p.device),
              "dtype": str(p.dtype).removeprefix("torch."),
              "methods": {name: r.to_dict() for name, r in results.items()}}
    if args.predictions:
        knowledge.write_predictions(args.predictions, results)
        err.print(f"saved {args.predictions}")
    out = Path(args.out) if args.out and args.out != "-" else Path(args.model) / f"eval-{args.task}-{split}.json"
    _emit(result, args, out, err)
