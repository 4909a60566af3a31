"""`train.py demo`: the whole pipeline on the bundled samples with the tiny preset, in a few minutes on a CPU.

prepare (data/samples) -> tokenizer -> pretrain -> SFT (ChatML) -> answers to a few questions. The final model
directory (`OUT/sft/latest`) holds the tokenizer too, so `python cli_demo.py --model OUT/sft/latest` chats with it.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from model.checkpoint import load_model
from utils.prepare import PrepareConfig, prepare_corpora, print_stats
from utils.tokenizer import Tokenizer, print_report, train_tokenizer

from .config import DemoConfig, PretrainConfig, SFTConfig
from .stages import pretrain, sample_fn, sft

# Questions from the bundled samples: a ~2M-parameter model trained for a minute can only recall what it saw.
DEMO_QUESTIONS = ["地球上最大的海洋是哪个？", "为什么吃辣会觉得热？", "怎么挑选牛油果？", "猫为什么会呼噜呼噜？"]


def demo(cfg: DemoConfig) -> Path:
    """Runs the pipeline under `cfg.out`; returns the final model directory."""
    console = Console()
    out = Path(cfg.out)
    t0 = time.perf_counter()
    loop = dict(cpu=True, mixed_precision="no", log_every=50, seed=cfg.seed, save_total_limit=1, eval_batches=4,
                warmup_steps=20, overwrite=True)  # a demo run starts over

    console.rule("1/4 prepare the bundled samples")
    stats = prepare_corpora(None, out / "data", PrepareConfig(split=(0.9, 0.05, 0.05), overwrite=True))
    print_stats(stats)

    console.rule("2/4 train the tokenizer")
    print_report(train_tokenizer(out / "data", cfg.vocab_size, out / "tokenizer"))

    console.rule("3/4 pretrain the tiny model")
    pretrain(PretrainConfig(data=str(out / "data"), tokenizer=str(out / "tokenizer"), preset="tiny", seq_len=128,
                            batch_size=16, max_steps=cfg.pretrain_steps, lr=5e-3, out_dir=str(out / "pretrain"),
                            **loop))

    console.rule("4/4 supervised fine-tuning (ChatML, prompt masked)")
    sft(SFTConfig(init=str(out / "pretrain" / "latest"), data=str(out / "data"), template="chatml",
                  max_seq_length=256, batch_size=8, max_steps=cfg.sft_steps, lr=3e-3, out_dir=str(out / "sft"),
                  **loop))

    final = out / "sft" / "latest"
    answers = sample_fn(Tokenizer.load(final), "chatml", DEMO_QUESTIONS, max_new_tokens=80)(load_model(final))
    table = Table(title="the demo model answers (greedy, repetition penalty 1.1)")
    table.add_column("question")
    table.add_column("answer", overflow="fold")
    for question, answer in answers:
        table.add_row(question, answer)
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Chat with it: python cli_demo.py --model {final}")
    return final
