"""Chat-LM-small: the one command line.

    python train.py {prepare,tokenizer,pretrain,sft,lora,dpo,merge,eval,synth,demo} --help

A user error prints one line and exits 2; add --debug anywhere for its traceback.

Each subcommand lives in the module that does the work; the module exposes
`add_arguments(parser, command)` and `main(args)` (the training stages through
trainer/args.py, which builds their options from the dataclass configs). Modules
are imported only when their subcommand runs, so `--help` and light commands
start fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from utils.errors import user_errors_exit
from utils.threads import use_free_cores

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("utils.prepare", "raw corpora -> cleaned, deduplicated, split parquet shards"),
    "tokenizer": ("utils.tokenizer", "train a byte-level BPE tokenizer on prepared data"),
    "pretrain": ("trainer.args", "pretrain a decoder on packed documents"),
    "sft": ("trainer.args", "supervised fine-tuning with the prompt masked out of the loss"),
    "lora": ("trainer.args", "train a LoRA / QLoRA adapter on a base model"),
    "dpo": ("trainer.args", "direct preference optimization on chosen/rejected answer pairs"),
    "merge": ("trainer.args", "merge a LoRA adapter into its base model"),
    "eval": ("utils.eval_cli", "CMMLU / C-Eval / GAOKAO accuracy, bits per character, answer loss and BLEU / ROUGE"),
    "synth": ("utils.synth", "build instruction data through an OpenAI-compatible API (topics, dialogues, style)"),
    "demo": ("trainer.args", "the whole pipeline on the bundled samples with the tiny preset"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once, and only where there is one (not for required options, not when the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args)


def cli(argv: list[str] | None = None) -> None:
    """The command line: a user error (missing file, bad option value, bad data) is one line and exit 2; `--debug`
    (anywhere in the command) shows its traceback. A run stopped by a signal exits 128 + the signal (130, 143).
    torch gets one thread per free core (utils/threads.py)."""
    argv = sys.argv[1:] if argv is None else argv
    use_free_cores()  # CPU work: one torch thread per free core (OMP_NUM_THREADS overrides)
    with user_errors_exit(debug="--debug" in argv):
        main([a for a in argv if a != "--debug"])


if __name__ == "__main__":
    cli()
