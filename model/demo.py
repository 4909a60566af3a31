"""`train.py demo`: the whole pipeline on the bundled samples with the tiny preset, in a few minutes on a CPU.

prepare (data/samples) -> tokenizer -> pretrain -> SFT (ChatML) -> answers to a few questions. The final model
directory (`OUT/sft/latest`) holds the tokenizer too, so `python cli_demo.py --model OUT/sft/latest` chats with it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Questions from the bundled samples: a ~2M-parameter model trained for a minute can only recall what it saw.
DEMO_QUESTIONS = ["地球上最大的海洋是哪个？", "为什么吃辣会觉得热？", "怎么挑选牛油果？", "猫为什么会呼噜呼噜？"]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (data, tokenizer, runs)")
    parser.add_argument("--vocab-size", type=int, default=4000, help="tokenizer vocabulary size")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="pretraining optimizer steps")
    parser.add_argument("--sft-steps", type=int, default=600, help="SFT optimizer steps")
    parser.add_argument("--seed", type=int, default=42, help="random seed")


def run_stage(command: str, argv: list[str]) -> dict:
    """Run a train.py training subcommand in-process (same parser, same code path as the CLI)."""
    from . import cli
    parser = argparse.ArgumentParser(prog=f"train.py {command}")
    cli.add_arguments(parser, command)
    args = parser.parse_args(argv)
    args.command = command
    return getattr(cli, command)(args)


def main(args: argparse.Namespace) -> None:
    from utils.prepare import PrepareConfig, prepare_corpora, print_stats
    from utils.tokenizer import Tokenizer, print_report, train_tokenizer

    from .checkpoint import load_model
    from .cli import sample_fn

    console = Console()
    out = Path(args.out)
    t0 = time.perf_counter()
    train_opts = ["--cpu", "--mixed-precision", "no", "--log-every", "50", "--seed", str(args.seed),
                  "--save-total-limit", "1", "--eval-batches", "4"]

    console.rule("1/4 prepare the bundled samples")
    stats = prepare_corpora(None, out / "data", PrepareConfig(split=(0.9, 0.05, 0.05), overwrite=True))
    print_stats(stats)

    console.rule("2/4 train the tokenizer")
    print_report(train_tokenizer(out / "data", args.vocab_size, out / "tokenizer"))

    console.rule("3/4 pretrain the tiny model")
    run_stage("pretrain", ["--data", str(out / "data"), "--tokenizer", str(out / "tokenizer"), "--preset", "tiny",
                           "--seq-len", "128", "--batch-size", "16", "--max-steps", str(args.pretrain_steps),
                           "--warmup-steps", "20", "--lr", "5e-3", "--out", str(out / "pretrain"), *train_opts])

    console.rule("4/4 supervised fine-tuning (ChatML, prompt masked)")
    run_stage("sft", ["--init", str(out / "pretrain" / "latest"), "--data", str(out / "data"), "--template", "chatml",
                      "--max-seq-length", "256", "--batch-size", "8", "--max-steps", str(args.sft_steps),
                      "--warmup-steps", "20", "--lr", "3e-3", "--out", str(out / "sft"), *train_opts])

    final = out / "sft" / "latest"
    answers = sample_fn(Tokenizer.load(final), "chatml", DEMO_QUESTIONS, max_new_tokens=80)(load_model(final))
    table = Table(title="the demo model answers (greedy, repetition penalty 1.1)")
    table.add_column("question")
    table.add_column("answer", overflow="fold")
    for question, answer in answers:
        table.add_row(question, answer)
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Chat with it: python cli_demo.py --model {final}")
