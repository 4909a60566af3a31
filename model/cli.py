"""`train.py pretrain | sft | lora | merge`: build the model and data, hand them to the shared Trainer."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from utils.tokenizer import Tokenizer

from .checkpoint import load_model, load_weights_into, write_model_files
from .config import PRESETS, ModelConfig
from .trainer import TrainConfig, Trainer, make_accelerator, set_seed_everywhere
from .transformer import Transformer

DEFAULT_SAMPLE_PROMPTS = ["什么是机器学习？", "感冒了应该注意什么？", "请介绍一下长城。"]

TRAIN_HELP = {
    "out_dir": "run directory (checkpoints, logs, tensorboard)",
    "epochs": "passes over the training data (ignored when --max-steps > 0)",
    "max_steps": "optimizer steps; 0 derives them from --epochs",
    "batch_size": "rows per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "cosine decays to lr x this",
    "warmup_steps": "linear warmup steps",
    "schedule": "learning-rate schedule after warmup",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "max gradient norm (0 disables clipping)",
    "mixed_precision": "auto = bf16 on a GPU that supports it, else no",
    "compile": "torch.compile the model (a graph per decoder block with --offload-activations or a 4-bit base)",
    "gradient_checkpointing": "recompute each decoder block in backward (less memory, ~30%% more compute)",
    "no_recompute_last": "with --gradient-checkpointing, the last N blocks keep their activations instead of "
                         "recomputing them (faster; more memory per block kept)",
    "offload_activations": "with --gradient-checkpointing, what recomputed blocks save goes to pinned host memory "
                           "during the forward and comes back for the backward; with --compile each block is "
                           "compiled on its own and also saves its MLP gate/up projections instead of recomputing "
                           "them (faster at less GPU memory; needs host memory and a fast host link, a GPU's job)",
    "offload_skip_last": "with --offload-activations, the last N recomputed blocks keep what they save on the GPU "
                         "(their backward comes first, before copies could return)",
    "ddp_bucket_mb": "DDP gradient bucket size in MiB: each bucket's all-reduce overlaps the rest of the backward "
                     "(under --compile the graph is split at each bucket; larger buckets, fewer splits)",
    "log_every": "log every N optimizer steps",
    "eval_every": "evaluate every N steps (0 = only at the end)",
    "eval_batches": "batches per evaluation",
    "save_every": "checkpoint every N steps (0 = only at the end)",
    "save_total_limit": "keep the newest N checkpoints (0 keeps all)",
    "seed": "random seed (data order, init, dropout)",
    "resume": "resume from the run's latest checkpoint (flag alone) or from a checkpoint path",
    "cpu": "train on the CPU even when a GPU is present",
}
CHOICES = {"schedule": ["cosine", "constant"], "mixed_precision": ["auto", "no", "bf16", "fp16"]}


def add_train_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Every TrainConfig field as an option (defaults overridable per command)."""
    group = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in TRAIN_HELP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        if f.name == "out_dir":
            group.add_argument("--out", "--out-dir", dest="out_dir", default=default, help=TRAIN_HELP[f.name])
        elif f.name == "resume":
            group.add_argument(flag, nargs="?", const="auto", default=None, help=TRAIN_HELP[f.name])
        elif f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=TRAIN_HELP[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
            group.add_argument(flag, type=kind, default=default, choices=CHOICES.get(f.name),
                               help=TRAIN_HELP[f.name])


def add_sft_data_arguments(parser: argparse.ArgumentParser, max_seq_length: int) -> None:
    """Options shared by `sft` and `lora`: row length and what happens to long or prompt tokens."""
    parser.add_argument("--max-seq-length", type=int, default=max_seq_length, help="tokens per packed row")
    parser.add_argument("--skip-overlength", action=argparse.BooleanOptionalAction, default=False,
                        help="drop examples longer than --max-seq-length instead of truncating them")
    parser.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=False,
                        help="learn the prompt tokens too (no masking; the seed ChatBaichuan-HC3 recipe masked nothing)")


def train_config(args: argparse.Namespace, **extra) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}, **extra)


class FullModelIO:
    """Checkpoints hold a complete model directory (loadable by load_model and transformers) + the tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def save(self, model: Transformer, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        write_model_files(model, out_dir, state=state)
        self.tokenizer.save(out_dir)

    def load(self, model: Transformer, ckpt_dir: Path) -> None:
        load_weights_into(model, ckpt_dir)


def sample_fn(tokenizer: Tokenizer, template: str, prompts: list[str], max_new_tokens: int = 48):
    """Greedy answers to a few questions (for the training log and the demo): model -> [(question, answer)]."""
    from .generation import SamplingConfig, generate_answers
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    config = SamplingConfig(temperature=0.0, repetition_penalty=1.1, max_new_tokens=max_new_tokens)

    def samples(model: Transformer) -> list[tuple[str, str]]:
        answers, _ = generate_answers(model, tokenizer, conversations, template, config, batch_size=len(prompts))
        return [(p, "(does not fit the context window)" if a is None else a) for p, a in zip(prompts, answers)]
    return samples


# ---- pretrain / sft ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "pretrain":
        parser.add_argument("--data", required=True, help="prepared data directory (train-*.parquet, valid-*)")
        parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
        parser.add_argument("--preset", default="small", choices=list(PRESETS), help="model shape")
        parser.add_argument("--init", default=None, help="continue pretraining from this model directory")
        parser.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
        parser.add_argument("--cache-dir", default=None, help="token cache location (default DATA/.cache)")
        add_train_arguments(parser, out_dir="runs/pretrain", lr=6e-4, warmup_steps=200)
    elif command == "sft":
        parser.add_argument("--init", required=True, help="model directory to fine-tune (e.g. runs/pretrain/latest)")
        parser.add_argument("--data", required=True, help="prepared data directory (its train/valid splits)")
        parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --init directory)")
        parser.add_argument("--template", default=None,
                            help="chat template: chatml, wenda, human_assistant, llama2, raw (default: tokenizer's)")
        add_sft_data_arguments(parser, max_seq_length=512)
        add_train_arguments(parser, out_dir="runs/sft", lr=1e-4, warmup_steps=50, epochs=2.0)
    else:
        from . import lora_cli
        lora_cli.add_arguments(parser, command)


def main(args: argparse.Namespace) -> None:
    if args.command == "pretrain":
        pretrain(args)
    elif args.command == "sft":
        sft(args)
    else:
        from . import lora_cli
        lora_cli.main(args)


def pretrain(args: argparse.Namespace) -> dict:
    from utils.datasets import pretrain_loader
    cfg = train_config(args)
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)  # same init on every rank
    tokenizer = Tokenizer.load(args.tokenizer)
    if args.init:
        model = load_model(args.init, dtype=torch.float32)
    else:
        model = Transformer(ModelConfig.preset(
            args.preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=max(args.seq_len, 512),
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id))
    train = pretrain_loader(args.data, tokenizer, "train", args.seq_len, cfg.batch_size, acc.process_index,
                            acc.num_processes, cfg.seed, args.cache_dir)
    valid = pretrain_loader(args.data, tokenizer, "valid", args.seq_len, cfg.batch_size, acc.process_index,
                            acc.num_processes, cfg.seed, args.cache_dir)
    trainer = Trainer(model, train, cfg, FullModelIO(tokenizer), eval_loader=valid.eval_batches,
                      chars_per_token=valid.chars_per_token, accelerator=acc,
                      run_info={"command": "pretrain", "data": str(args.data), "packing": train.report})
    return trainer.train()


def sft(args: argparse.Namespace) -> dict:
    from utils.datasets import sft_loader
    cfg = train_config(args, sample_prompts=DEFAULT_SAMPLE_PROMPTS)
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)
    tokenizer = Tokenizer.load(args.tokenizer or args.init)
    template = args.template or tokenizer.default_template
    model = load_model(args.init, dtype=torch.float32)
    from .generation import default_stop_ids
    model.config.eos_token_id = list(default_stop_ids(tokenizer, template))  # stop at the end of a turn too
    common = dict(tokenizer=tokenizer, template=template, max_seq_len=args.max_seq_length, batch_size=cfg.batch_size,
                  rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                  skip_overlength=args.skip_overlength, train_on_prompt=args.train_on_prompt)
    train = sft_loader(args.data, split="train", **common)
    valid = sft_loader(args.data, split="valid", **common)
    trainer = Trainer(model, train, cfg, FullModelIO(tokenizer), eval_loader=valid.eval_batches, accelerator=acc,
                      sample_fn=sample_fn(tokenizer, template, cfg.sample_prompts),
                      run_info={"command": "sft", "data": str(args.data), "template": template,
                                "packing": train.report})
    return trainer.train()
