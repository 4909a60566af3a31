"""The training stages as functions of their config: build the model and the data, hand them to the one loop.

    from trainer.stages import PretrainConfig, pretrain
    pretrain(PretrainConfig(data="data/corpus", tokenizer="data/tokenizer", preset="tiny", max_steps=100))

`pretrain` and `sft` train every weight and checkpoint whole model directories; `lora` trains LoRA / QLoRA adapters
on a frozen base (ours or a 7B HF checkpoint) and checkpoints PEFT-format adapter directories; `dpo` does either on
preference pairs (trainer/dpo.py); `merge` folds an adapter into its base.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.checkpoint import load_base, load_model, load_weights_into, save_model, write_model_files
from model.config import ModelConfig
from model.generation import SamplingConfig, default_stop_ids, generate_answers
from model.lora import (
    apply_lora,
    load_adapter,
    merge_and_unload,
    read_adapter_weights,
    save_adapter,
    set_lora_state_dict,
)
from model.transformer import Transformer
from utils.corpora import read_records
from utils.knowledge import load_questions, score
from utils.pairs import pair_splits
from utils.tokenizer import Tokenizer

from .config import DPOConfig, LoraAdapterConfig, LoraConfig, MergeConfig, PretrainConfig, SFTConfig, TrainConfig
from .data import pair_loader, pretrain_loader, sft_loader, tokenizer_fingerprint
from .dpo import DPOObjective, FrozenReference, PreferenceLoss, as_scorer, base_reference, precompute_reference
from .loop import LanguageModeling, Trainer, make_accelerator, set_seed_everywhere, weights_device

__all__ = ["DPOConfig", "LoraConfig", "MergeConfig", "PretrainConfig", "SFTConfig", "dpo", "lora", "merge", "pretrain",
           "sft"]

DEFAULT_SAMPLE_PROMPTS = ["什么是机器学习？", "感冒了应该注意什么？", "请介绍一下长城。"]


class FullModelIO:
    """Checkpoints hold a complete model directory (loadable by load_model and transformers) + the tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def save(self, model: Transformer, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        write_model_files(model, out_dir, state=state)
        self.tokenizer.save(out_dir)

    def load(self, model: Transformer, ckpt_dir: Path) -> None:
        load_weights_into(model, ckpt_dir)


class AdapterIO:
    """Checkpoints hold only the adapter (PEFT format) plus the training state."""

    def __init__(self, base: str):
        self.base = base

    def save(self, model, out_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        save_adapter(model, out_dir, base_model_name_or_path=self.base, state=state)

    def load(self, model, ckpt_dir: Path) -> None:
        set_lora_state_dict(model, read_adapter_weights(ckpt_dir), source=str(ckpt_dir))


def sample_fn(tokenizer: Tokenizer, template: str, prompts: list[str], max_new_tokens: int = 48):
    """Greedy answers to a few questions (for the training log and the demo): model -> [(question, answer)]."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    config = SamplingConfig(temperature=0.0, repetition_penalty=1.1, max_new_tokens=max_new_tokens)

    def samples(model: Transformer) -> list[tuple[str, str]]:
        answers, _ = generate_answers(model, tokenizer, conversations, template, config, batch_size=len(prompts))
        return [(p, "(does not fit the context window)" if a is None else a) for p, a in zip(prompts, answers)]
    return samples


def check_fits(model: Transformer, tokenizer: Tokenizer, seq_len: int, source: str, resize: bool = False) -> None:
    """Before any work: the tokenizer's ids fit the model's embedding (with `resize`, new rows are added for new
    tokens) and the rows fit its positions."""
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        if not resize:
            raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                             f"{config.vocab_size} rows: use the model's own tokenizer, or --resize-embeddings for "
                             f"tokens added to it")
        model.resize_token_embeddings(tokenizer.vocab_size)
    specials = {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "bos": tokenizer.bos_id}
    outside = {name: i for name, i in specials.items() if i is not None and i >= config.vocab_size}
    if outside:
        raise ValueError(f"{source}: special token ids {outside} lie outside the model's {config.vocab_size} rows")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"{source}: rows of {seq_len} tokens exceed the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); use at most that")


def check_same_tokenizer(model_dir: str, tokenizer_dir: str | None, resize: bool) -> None:
    """A tokenizer other than the one saved with the model maps ids to other tokens: refused unless asked for."""
    if not tokenizer_dir or resize or Path(tokenizer_dir).resolve() == Path(model_dir).resolve():
        return
    try:
        own = Tokenizer.load(model_dir)
    except (OSError, ValueError):
        return  # no tokenizer saved with the model: nothing to compare
    other = Tokenizer.load(tokenizer_dir)
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(other):
        raise ValueError(f"--tokenizer {tokenizer_dir} ({other.vocab_size} tokens) is not the tokenizer {model_dir} "
                         f"was trained with ({own.vocab_size} tokens): leave --tokenizer out to use the model's own, "
                         f"or --resize-embeddings if it extends that one")


def fit_batch_to_data(loader, cfg: TrainConfig, acc, row_flag: str) -> TrainConfig:
    """Tiny data (or long rows) that packs into fewer rows than a batch takes (--batch-size x processes) would fail
    at the first step: the batch takes the rows there are, said in one line, and the config saved with the
    checkpoints says so too. Fewer rows than processes is refused before any work. (Without --batch-size the
    trainer's batch plan keeps to the rows there are: trainer/batching.py.)"""
    if not cfg.batch_size:
        return cfg
    rows, world = loader.plan().n_rows, acc.num_processes
    if rows >= loader.batch_size * world:
        return cfg
    length = getattr(loader, "seq_len", None) or loader.capacity
    data = f"--data {cfg.data} packs into {rows} row{'s' if rows != 1 else ''} of {length} tokens"
    if rows < world:
        raise ValueError(f"{data}, fewer than the {world} processes: give more data, a smaller {row_flag}, or "
                         f"fewer processes")
    acc.print(f"note: {data} per epoch, too few for --batch-size {loader.batch_size} x {world} process"
              f"{'es' if world > 1 else ''}: batches of {rows // world} rows instead (a smaller {row_flag} or "
              f"more data makes more rows)")
    loader.batch_size = rows // world
    return dataclasses.replace(cfg, batch_size=loader.batch_size)


def knowledge_fn(cfg: TrainConfig, tokenizer: Tokenizer, template: str | None):
    """The --eval-tasks benchmarks as an evaluation hook (model -> metrics), their questions read now, before any
    training, so a wrong path fails at once; None without --eval-tasks."""
    if not cfg.eval_tasks:
        return None
    tasks = {task: load_questions(task, Path(cfg.eval_tasks_data) / task, limit=cfg.eval_tasks_limit)
             for task in (t.strip() for t in cfg.eval_tasks.split(",")) if task}

    def knowledge(model: Transformer) -> dict[str, float]:
        metrics = {}
        for task, questions in tasks.items():
            overall = score(model, tokenizer, questions, "letter", template, batch_size=cfg.start_rows).overall
            metrics |= {f"eval/{task}_centered": overall.centered, f"eval/{task}_acc": overall.accuracy}
        return metrics
    return knowledge


def new_model(model_cfg: ModelConfig, cfg: PretrainConfig) -> Transformer:
    """A decoder to pretrain from scratch, with the recipe's choices of head and initialization."""
    if cfg.untie_embeddings:
        model_cfg = dataclasses.replace(model_cfg, tie_word_embeddings=False)
    model = Transformer(model_cfg)
    if cfg.zero_init_residual:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model


def pretrain(cfg: PretrainConfig) -> dict:
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)  # same init on every rank
    tokenizer = Tokenizer.load(cfg.tokenizer)
    if cfg.init:
        check_same_tokenizer(cfg.init, cfg.tokenizer, cfg.resize_embeddings)
        model = load_model(cfg.init, dtype=torch.float32)
        check_fits(model, tokenizer, cfg.seq_len, cfg.init, cfg.resize_embeddings)
    else:
        model = new_model(ModelConfig.preset(
            cfg.preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=max(cfg.seq_len, 512),
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id), cfg)
    model.z_loss = cfg.z_loss
    loaders = [pretrain_loader(cfg.data, tokenizer, split, cfg.seq_len, cfg.start_rows, acc.process_index,
                               acc.num_processes, cfg.seed, cfg.cache_dir, document_masking=cfg.document_masking)
               for split in ("train", "valid")]
    train, valid = loaders
    cfg = fit_batch_to_data(train, cfg, acc, "--seq-len")
    trainer = Trainer(model, train, cfg, FullModelIO(tokenizer), eval_loader=valid.eval_batches,
                      objective=LanguageModeling(valid.chars_per_token), accelerator=acc,
                      knowledge_fn=knowledge_fn(cfg, tokenizer, template=None),
                      run_info={"command": "pretrain", "data": str(cfg.data), "packing": train.report})
    return trainer.train()


def sft(cfg: SFTConfig) -> dict:
    if not cfg.sample_prompts:
        cfg = dataclasses.replace(cfg, sample_prompts=list(DEFAULT_SAMPLE_PROMPTS))
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.init)
    template = cfg.template or tokenizer.default_template
    check_same_tokenizer(cfg.init, cfg.tokenizer, cfg.resize_embeddings)
    model = load_model(cfg.init, dtype=torch.float32)
    check_fits(model, tokenizer, cfg.max_seq_length, cfg.init, cfg.resize_embeddings)
    model.config.eos_token_id = list(default_stop_ids(tokenizer, template))  # stop at the end of a turn too
    common = _sft_data(cfg, tokenizer, template, acc)
    train = sft_loader(cfg.data, split="train", **common)
    valid = sft_loader(cfg.data, split="valid", **common)
    cfg = fit_batch_to_data(train, cfg, acc, "--max-seq-length")
    trainer = Trainer(model, train, cfg, FullModelIO(tokenizer), eval_loader=valid.eval_batches, accelerator=acc,
                      sample_fn=sample_fn(tokenizer, template, cfg.sample_prompts),
                      knowledge_fn=knowledge_fn(cfg, tokenizer, template),
                      run_info={"command": "sft", "data": str(cfg.data), "template": template,
                                "packing": train.report})
    return trainer.train()


def _sft_data(cfg: SFTConfig | LoraConfig, tokenizer: Tokenizer, template: str, acc) -> dict:
    """The SFT loader's arguments that a stage's config and the accelerator decide."""
    return dict(tokenizer=tokenizer, template=template, max_seq_len=cfg.max_seq_length, batch_size=cfg.start_rows,
                rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                skip_overlength=cfg.skip_overlength, train_on_prompt=cfg.train_on_prompt)


def parse_targets(text: str) -> list[str] | str:
    """`all-linear`, a regex (anything with regex syntax), or a comma-separated list of module names."""
    if text == "all-linear" or any(c in text for c in "^$*+?()[]|\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def adapted_base(cfg: LoraAdapterConfig, base: str, tokenizer: Tokenizer, seq_len: int, acc,
                 init_adapter: str | None = None) -> Transformer:
    """The frozen base (NF4 with --qlora) with trainable LoRA adapters: fresh ones, or `init_adapter`'s."""
    on_gpu = acc.device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    if cfg.qlora and not on_gpu:
        acc.print("note: --qlora on the CPU works but is slow; it is meant for CUDA")
    model = load_base(base, dtype, weights_device(acc, cfg.qlora), cfg.qlora)
    check_fits(model, tokenizer, seq_len, base)  # a frozen base cannot learn new tokens' rows
    if init_adapter:
        load_adapter(model, init_adapter, trainable=True)
    else:
        apply_lora(model, cfg.r, cfg.alpha, cfg.dropout, parse_targets(cfg.targets), use_rslora=cfg.rslora,
                   base_model_name_or_path=str(base))
    return model


def lora(cfg: LoraConfig) -> dict:
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer or cfg.base)
    check_same_tokenizer(cfg.base, cfg.tokenizer, resize=False)
    model = adapted_base(cfg, cfg.base, tokenizer, cfg.max_seq_length, acc, cfg.init_adapter)
    common = _sft_data(cfg, tokenizer, cfg.template, acc)
    train = sft_loader(read_records(cfg.format, cfg.data), **common)
    cfg = fit_batch_to_data(train, cfg, acc, "--max-seq-length")
    eval_records = read_records(cfg.format, cfg.eval_data) if cfg.eval_data else []
    valid = sft_loader(eval_records, **common) if eval_records else None
    samples = sample_fn(tokenizer, cfg.template, [r["prompt"] for r in eval_records[:2]]) if eval_records else None
    trainer = Trainer(model, train, cfg, AdapterIO(str(cfg.base)), accelerator=acc,
                      eval_loader=valid.eval_batches if valid else None, sample_fn=samples,
                      knowledge_fn=knowledge_fn(cfg, tokenizer, cfg.template),
                      run_info={"command": "lora", "base": str(cfg.base), "data": str(cfg.data),
                                "template": cfg.template, "qlora": cfg.qlora, "packing": train.report})
    return trainer.train()


def dpo(cfg: DPOConfig) -> dict:
    """DPO of a whole model (--init; the reference a frozen copy, or --ref) or of LoRA adapters on a frozen base
    (--base --lora; the reference the base with the adapters disabled)."""
    if not cfg.sample_prompts:
        cfg = dataclasses.replace(cfg, sample_prompts=list(DEFAULT_SAMPLE_PROMPTS))
    acc = make_accelerator(cfg)
    set_seed_everywhere(cfg.seed)
    source = cfg.base if cfg.lora else cfg.init
    tokenizer = Tokenizer.load(cfg.tokenizer or source)
    template = cfg.template or tokenizer.default_template
    check_same_tokenizer(source, cfg.tokenizer, resize=False)
    if cfg.lora:
        model = adapted_base(cfg, cfg.base, tokenizer, cfg.max_seq_length, acc)
        reference, weights_io = base_reference, AdapterIO(str(cfg.base))
    else:
        model = load_model(cfg.init, dtype=torch.float32)
        check_fits(model, tokenizer, cfg.max_seq_length, cfg.init)
        model.config.eos_token_id = list(default_stop_ids(tokenizer, template))  # stop at the end of a turn too
        frozen = load_model(cfg.ref or cfg.init, dtype=torch.float32)
        if frozen.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--ref {cfg.ref}: {frozen.config.vocab_size} embedding rows, the model "
                             f"{model.config.vocab_size}: the reference must share the model's tokenizer")
        reference = FrozenReference(as_scorer(frozen).to(acc.device).eval().requires_grad_(False))
        weights_io = FullModelIO(tokenizer)
    as_scorer(model)
    train_pairs, valid_pairs, tally = pair_splits(cfg.data, cfg.eval_data, cfg.valid_fraction, cfg.seed)
    common = dict(tokenizer=tokenizer, template=template, max_seq_len=cfg.max_seq_length, batch_size=cfg.start_rows,
                  rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                  skip_overlength=cfg.skip_overlength)
    train = pair_loader(train_pairs, **common)
    cfg = fit_batch_to_data(train, cfg, acc, "--max-seq-length")
    valid = pair_loader(valid_pairs, **common) if valid_pairs else None
    objective = DPOObjective(PreferenceLoss(cfg.beta, cfg.loss, cfg.label_smoothing), reference)
    read = {"read": tally.read, "dropped": dict(tally.dropped), "train": len(train_pairs), "valid": len(valid_pairs)}
    trainer = Trainer(model, train, cfg, weights_io, eval_loader=valid.eval_batches if valid else None,
                      objective=objective, accelerator=acc,
                      sample_fn=sample_fn(tokenizer, template, cfg.sample_prompts),
                      knowledge_fn=knowledge_fn(cfg, tokenizer, template),
                      run_info={"command": "dpo", "model": str(source), "lora": cfg.lora, "data": str(cfg.data),
                                "template": template, "pairs": read, "packing": train.report})
    trainer.log(f"pairs: {read}; train split tokenized: {train.examples.stats}")
    if cfg.precompute_ref:
        precompute_reference(objective, trainer.prepared, [train, *([valid] if valid else [])], acc.autocast)
        trainer.log(f"reference log-probabilities precomputed for {len(train_pairs) + len(valid_pairs)} pairs")
    return trainer.train()


def merge(cfg: MergeConfig) -> Path:
    """Base + adapter -> one model directory (the tokenizer comes along)."""
    dtype = getattr(torch, cfg.dtype)
    model = load_model(cfg.base, dtype=dtype)
    load_adapter(model, cfg.adapter, dtype=dtype)
    out = save_model(merge_and_unload(model), cfg.out, tokenizer=Tokenizer.load(cfg.base))
    print(f"merged {cfg.adapter} into {cfg.base} -> {cfg.out}")
    return out
