"""`train.py lora` (LoRA / QLoRA adapters on a base model dir, ours or a 7B HF checkpoint) and `train.py merge`."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from utils.tokenizer import Tokenizer

from .checkpoint import load_model, save_model
from .cli import add_sft_data_arguments, add_train_arguments, sample_fn, train_config
from .lora import (apply_lora, load_adapter, merge_and_unload, read_adapter_weights, save_adapter,
                   set_lora_state_dict)
from .trainer import Trainer, make_accelerator, set_seed_everywhere, weights_device

FORMATS = ["qa", "instruct", "alpaca", "sharegpt", "parquet"]
TEMPLATE_CHOICES = ["wenda", "human_assistant", "chatml", "qwen", "llama2", "raw"]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "merge":
        parser.add_argument("--base", required=True, help="base model directory")
        parser.add_argument("--adapter", required=True, help="adapter directory (ours or PEFT's)")
        parser.add_argument("--out", required=True, help="merged model directory to write")
        parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                            help="dtype of the merged weights")
        return
    parser.add_argument("--base", required=True, help="base model directory (ours, Llama, Qwen2/Qwen1.5, Baichuan)")
    parser.add_argument("--data", required=True, help="instruction data file or directory")
    parser.add_argument("--format", default="alpaca", choices=FORMATS, help="record format of --data")
    parser.add_argument("--eval-data", default=None, help="optional held-out file in the same format")
    parser.add_argument("--template", default="chatml", choices=TEMPLATE_CHOICES, help="chat template")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --base)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "
                        "Baichuan's W_pack), a regex, or all-linear (never lm_head)")
    parser.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=False,
                        help="scale = alpha / sqrt(r) (rank-stabilized LoRA)")
    parser.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=False,
                        help="quantize the base linears to NF4 (double quantization) while loading")
    add_sft_data_arguments(parser, max_seq_length=2048)
    parser.add_argument("--init-adapter", default=None, help="start from this adapter instead of fresh LoRA layers")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="base weights dtype; auto = bfloat16 on a GPU, float32 on the CPU")
    add_train_arguments(parser, out_dir="runs/lora", lr=2e-4, warmup_steps=20, epochs=2.0, batch_size=4,
                        weight_decay=0.0, save_every=200, save_total_limit=2)


def parse_targets(text: str) -> list[str] | str:
    """`all-linear`, a regex (anything with regex syntax), or a comma-separated list of module names."""
    if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def read_records(fmt: str, path: str | Path) -> list[dict]:
    """Instruction records (with multi-turn history and system text kept) for the SFT loader."""
    from utils.corpora import Tally, read_corpus
    tally = Tally()
    records = [{"prompt": r.prompt, "response": r.response, "history": list(r.history), "system": r.system}
               for r in read_corpus(fmt, path, tally=tally)]
    if not records:
        raise ValueError(f"{path}: no readable {fmt} records ({tally})")
    return records


class AdapterIO:
    """Checkpoints hold only the adapter (PEFT format) plus the training state."""

    def __init__(self, base: str):
        self.base = base

    def save(self, model, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        save_adapter(model, out_dir, base_model_name_or_path=self.base, state=state)

    def load(self, model, ckpt_dir: Path) -> None:
        set_lora_state_dict(model, read_adapter_weights(ckpt_dir), source=str(ckpt_dir))


def load_base(path: str, dtype: torch.dtype, device: torch.device, qlora: bool):
    """A base model for adapters; with qlora the block linears become NF4 one tensor at a time while loading."""
    hook = None
    if qlora:
        from .nf4 import nf4_hook
        hook = nf4_hook()
    return load_model(path, dtype=dtype, device=device, tensor_hook=hook)


def main(args: argparse.Namespace) -> dict | None:
    if args.command == "merge":
        return merge(args)
    from utils.datasets import sft_loader
    cfg = train_config(args)
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)
    on_gpu = acc.device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    if args.qlora and not on_gpu:
        acc.print("note: --qlora on the CPU works but is slow; it is meant for CUDA")
    tokenizer = Tokenizer.load(args.tokenizer or args.base)
    model = load_base(args.base, dtype, weights_device(acc, args.qlora), args.qlora)
    if args.init_adapter:
        load_adapter(model, args.init_adapter, trainable=True)
    else:
        apply_lora(model, args.r, args.alpha, args.dropout, parse_targets(args.targets), use_rslora=args.rslora,
                   base_model_name_or_path=str(args.base))
    common = dict(tokenizer=tokenizer, template=args.template, max_seq_len=args.max_seq_length,
                  batch_size=cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                  skip_overlength=args.skip_overlength, train_on_prompt=args.train_on_prompt)
    train = sft_loader(read_records(args.format, args.data), **common)
    eval_records = read_records(args.format, args.eval_data) if args.eval_data else []
    valid = sft_loader(eval_records, **common) if eval_records else None
    samples = sample_fn(tokenizer, args.template, [r["prompt"] for r in eval_records[:2]]) if eval_records else None
    trainer = Trainer(model, train, cfg, AdapterIO(str(args.base)), accelerator=acc,
                      eval_loader=valid.eval_batches if valid else None, sample_fn=samples,
                      run_info={"command": "lora", "base": str(args.base), "data": str(args.data),
                                "template": args.template, "qlora": args.qlora, "packing": train.report})
    return trainer.train()


def merge(args: argparse.Namespace) -> None:
    """Base + adapter -> one model directory (the tokenizer comes along)."""
    dtype = getattr(torch, args.dtype)
    model = load_model(args.base, dtype=dtype)
    load_adapter(model, args.adapter, dtype=dtype)
    save_model(merge_and_unload(model), args.out, tokenizer=Tokenizer.load(args.base))
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
