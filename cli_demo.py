"""Console chat with a model directory: streamed answers, multi-turn history fed back through the chat template.

    python cli_demo.py --model DIR            # chat; /clear resets, /exit or Ctrl-D quits, Ctrl-C stops an answer
    python cli_demo.py --model DIR --prompt "你好"   # one answer on stdout, then exit (for scripts)
    printf '你好\\n再见\\n' | python cli_demo.py --model DIR  # one answer per input line, the history kept

Earlier turns are part of every prompt; when they no longer fit the context window the oldest turns are dropped,
never the current question.
"""
from __future__ import annotations

import argparse
import signal
import sys

from rich.console import Console

from model.chat import DTYPES, Chat, load_chat_model
from utils.errors import user_errors_exit
from utils.templates import TEMPLATES

COMMANDS_HELP = "/clear resets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"
# C0 controls (and DEL) from a model are shown as their Unicode control pictures, never sent to the terminal raw
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {127: 0x2421}


def add_arguments(parser: argparse.ArgumentParser, command: str = "chat") -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                        help="chat template; unset = the tokenizer's own (tokenizer_config.json)")
    parser.add_argument("--system", default=None, help="system prompt for the conversation")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold; 1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.1,
                        help="divide the logits of tokens already in the conversation (Hugging Face); 1 = off")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed; unset = a different sample each time")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights dtype; auto = bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    parser.add_argument("--prompt", default=None, help="answer this one question, print the answer and exit")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs, tuned "
                        "kernels): ~7x faster on a GPU after ~20 s of compiling for the first answer")
    parser.add_argument("--verbose", action="store_true", help="print tokens/s and token counts after each answer")
    parser.add_argument("--lora", default=None, help="a LoRA adapter directory (ours or PEFT's) to apply to --model")
    parser.add_argument("--qlora", action="store_true", help="load the base linears as NF4 (4-bit) weights")
    parser.add_argument("--data", default=None, help="batch mode: answer every record of this file, then exit")
    parser.add_argument("--format", default="alpaca", help="record format of --data (qa, instruct, alpaca, "
                        "sharegpt, parquet)")
    parser.add_argument("--predictions", default=None, help="batch mode: JSON-lines output (prompt, reference, "
                        "prediction)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch mode: prompts generated together")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_chat(args: argparse.Namespace) -> Chat:
    model, tokenizer = load_chat_model(args.model, args.lora, args.qlora, args.device, args.dtype)
    return Chat.start(model, tokenizer, args.template, args.system, args.compile, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)


def answer(chat: Chat, question: str, out: Console, err: Console, verbose: bool) -> None:
    """Stream one answer to `out`; Ctrl-C stops it (what was shown stays in the history)."""
    reply = None
    try:
        reply = chat.reply(question)
        for delta in reply:
            out.print(delta.translate(_CONTROL_PICTURES), end="", markup=False, highlight=False, emoji=False,
                      soft_wrap=True)
        out.print()
    except ValueError as e:  # the question alone does not fit the context window
        out.print()
        err.print(f"[red]error:[/] {e}")
        return
    except KeyboardInterrupt:
        if reply is not None:
            reply.close()
        out.print()
        err.print("[dim](answer stopped)[/]")
        if reply is None:
            return
    if reply.text:
        chat.record(question, reply.text)
    elif reply.finish_reason == "stop":
        err.print("[dim](no answer: the model ended it at once)[/]")
    if verbose:
        speed, first = reply.tokens_per_second(), reply.first_token_seconds()
        err.print(f"[dim]{len(reply.token_ids)} tokens ({reply.prompt_tokens} in the prompt), "
                  f"{'-' if speed is None else f'{speed:.1f}'} tokens/s, "
                  f"first token {'-' if first is None else f'{first * 1000:.0f} ms'}, finish: {reply.finish_reason}[/]")


def predict(chat: Chat, records: list[dict], out_path: str, batch_size: int) -> tuple[int, int]:
    """Predict mode: every record's prompt (with its history and system text) answered in batches, written
    as JSON lines {prompt, reference, prediction} (atomically); a record too long for the context window gets
    prediction null. Returns (records written, records that did not fit)."""
    import json

    from model.generation import generate_answers
    from utils.io import atomic_write_text
    conversations = []
    for r in records:
        messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        for q, a in r.get("history", []):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conversations.append(messages + [{"role": "user", "content": r["prompt"]}])
    answers, _ = generate_answers(chat.model, chat.tokenizer, conversations, chat.template, chat.config, batch_size,
                                  progress=True)
    lines = [json.dumps({"prompt": r["prompt"], "reference": r["response"], "prediction": a}, ensure_ascii=False)
             for r, a in zip(records, answers)]
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return len(lines), answers.count(None)


def run(chat: Chat, lines, out: Console, err: Console, verbose: bool, interactive: bool) -> None:
    """The loop over user input. `lines` yields input lines and raises EOFError at the end."""
    while True:
        try:
            line = lines()
        except EOFError:
            if interactive:
                out.print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            out.print()
            continue
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/clear":
            chat.clear()
            if interactive:
                out.clear()
                out.print(f"[dim]conversation cleared; {COMMANDS_HELP}[/]")
            continue
        if interactive:
            out.print("[bold cyan]Assistant[/]: ", end="")
        answer(chat, question, out, err, verbose)


def main(args: argparse.Namespace) -> None:
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        chat = build_chat(args)
    except (OSError, ValueError, KeyError) as e:
        err.print(f"[red]error:[/] {e}")
        raise SystemExit(2) from None
    if args.prompt is not None:
        answer(chat, args.prompt, out, err, args.verbose)
        return
    if args.data or args.predictions:
        if not (args.data and args.predictions):
            err.print("[red]error:[/] batch mode needs both --data and --predictions")
            raise SystemExit(2)
        from utils.corpora import read_records
        n, skipped = predict(chat, read_records(args.format, args.data), args.predictions, args.batch_size)
        err.print(f"wrote {n} predictions to {args.predictions}" + (f" ({skipped} too long for the context window: "
                                                                      "prediction null)" if skipped else ""))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        # Ctrl-C stops an answer even when the shell that started us ignores SIGINT (a job started with `&` from a
        # script), whose setting Python would otherwise keep
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
        p = next(chat.model.parameters())
        out.print(f"[bold]Chat-LM-small[/] · {args.model} · template {chat.template.name} · {p.device} "
                  f"{str(p.dtype).removeprefix('torch.')}\n[dim]{COMMANDS_HELP}[/]")
        lines = lambda: input("User: ")  # noqa: E731  a plain prompt, so readline knows its width
    else:
        def lines() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line
    run(chat, lines, out, err, args.verbose, interactive)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the usage examples' line breaks and shows every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    with user_errors_exit(args.debug):
        main(args)
