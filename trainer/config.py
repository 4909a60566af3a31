"""The stages' settings as dataclasses: the Python API takes them, and `train.py` builds its options from them
(trainer/args.py). A field's `help` metadata makes it a command-line option; a stage changes a default by declaring
the field again."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.config import PRESETS

TEMPLATE_CHOICES = ["chatml", "qwen", "wenda", "human_assistant", "llama2", "raw"]
RECORD_FORMATS = ["qa", "instruct", "alpaca", "sharegpt", "parquet"]
DPO_LOSSES = ["sigmoid", "ipo", "hinge"]


def tokens_or_auto(text: str) -> int | str:
    """--tokens-per-batch: "auto" or a positive number of tokens."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a positive number of tokens, got {text!r}")
    return value


def option(default: Any = None, help: str = "", **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line option (`--name-with-dashes`); `required=True` for options
    without a default, `flags` for other spellings, other keys go to `add_argument`."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(kw_only=True)
class TrainConfig:
    """The loop's settings, shared by every training stage."""

    out_dir: str = option("runs/train", "run directory (checkpoints, logs, tensorboard)", flags=["--out", "--out-dir"])
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0 derives them from --epochs")
    batch_size: int | None = option(None, "rows per micro-batch per process; unset = planned from "
                                          "--tokens-per-batch (on the CPU the stage's small default: 8, lora and "
                                          "dpo 4)")
    grad_accum: int | None = option(None, "micro-batches per optimizer step; unset = planned from "
                                          "--tokens-per-batch (on the CPU 1)")
    tokens_per_batch: int | str = option("auto", "tokens per optimizer step per process (rows x row length x "
                                                 "accumulation; default auto: on a GPU the stage's budget, pretrain "
                                                 "131072, sft 65536, lora and dpo 32768, lowered on small data, with "
                                                 "rows per micro-batch fitted to 80%% of the free memory by a probe "
                                                 "step; on the CPU the small default batch). --batch-size and "
                                                 "--grad-accum win over it", type=tokens_or_auto)
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine and wsd decay to lr x this")
    warmup_steps: int = option(100, "linear warmup steps")
    schedule: str = option("cosine", "learning-rate schedule after warmup: cosine, constant, or wsd (warmup-stable-"
                                     "decay: constant, then linear down to lr x --min-lr-ratio over the last "
                                     "--decay-ratio of the steps)", choices=["cosine", "constant", "wsd"])
    decay_ratio: float = option(0.2, "with --schedule wsd: the share of the steps that decays")
    optimizer: str = option("adamw", "adamw, or muon: torch.optim.Muon for the decoder blocks' matrices (attention, "
                                     "MLP), its update scaled to AdamW's RMS (adjust_lr_fn=match_rms_adamw) so --lr "
                                     "and --weight-decay carry over, and AdamW for the rest; whole models in one "
                                     "process or DDP (not LoRA, not FSDP)", choices=["adamw", "muon"])
    weight_decay: float = option(0.1, "weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max gradient norm (0 disables clipping)")
    mixed_precision: str = option("auto", "auto = bf16 on a GPU that supports it, else no",
                                  choices=["auto", "no", "bf16", "fp16"])
    compile: bool | None = option(None, "torch.compile the model (a graph per decoder block with "
                                        "--offload-activations or a 4-bit base); default auto: on for CUDA, off on "
                                        "the CPU")
    gradient_checkpointing: bool = option(False, "recompute each decoder block in backward (less memory, ~30%% "
                                                 "more compute)")
    offload_activations: bool = option(False, "with --gradient-checkpointing, what recomputed blocks save goes to "
                                              "pinned host memory during the forward and comes back for the "
                                              "backward; with --compile each block also saves its MLP gate/up "
                                              "projections instead of recomputing them (7B-class models on a GPU)")
    log_every: int = option(10, "log every N optimizer steps")
    eval_every: int = option(0, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = option(50, "evaluation covers this many batches of --batch-size rows (8 when unset) per "
                                   "process, the same rows whatever the batch plan, run in the plan's micro-batches")
    eval_at_start: bool = option(False, "evaluate (and print the sample answers) once before the first step")
    eval_tasks: str | None = option(None, "knowledge benchmarks scored at each evaluation, comma-separated (cmmlu, "
                                          "ceval): centered accuracy goes to the log and TensorBoard")
    eval_tasks_data: str = option("data/eval", "the folder that holds each --eval-tasks benchmark as it ships "
                                               "(DIR/cmmlu/, DIR/ceval/)")
    eval_tasks_limit: int = option(500, "questions per benchmark at each evaluation (spread over its subjects)")
    save_every: int = option(0, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = option(3, "keep the newest N checkpoints (0 keeps all)")
    seed: int = option(42, "random seed (data order, init, dropout)")
    resume: str | None = option(None, "resume from the run's latest checkpoint (flag alone) or from a checkpoint "
                                      "path", nargs="?", const="auto")
    resume_fallback: bool = option(False, "with --resume, a damaged checkpoint gives way to the newest earlier one")
    overwrite: bool = option(False, "start a new run in a run directory that holds checkpoints (they are replaced "
                                    "as the new run saves)")
    cpu: bool = option(False, "train on the CPU even when a GPU is present")
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily at each evaluation

    trains_adapters = False  # only LoRA adapters train, on a frozen base
    # The batch when --batch-size / --grad-accum are unset (trainer/batching.py): on the CPU `cpu_rows` rows per step,
    # on a GPU a budget of `gpu_tokens_per_batch` tokens per step. Pretraining 128k (256 rows of 512): a quarter of
    # nanoGPT's / nanochat's 0.5M, which suits runs of hours, so that a few-minute run of `small` still takes
    # thousands of steps. SFT 64k (128 rows of 512, as fine-tuning recipes' 64-128 sequences per step). LoRA 32k (16
    # rows of 2048, the PEFT recipes' 4 x 4 sequences; a step of a 7B model takes seconds). DPO 32k: about 64 pairs
    # of ~250-token sequences, zephyr's 64 pairs per step (rows hold a pair's two sequences).
    cpu_rows: ClassVar[int] = 8
    gpu_tokens_per_batch: ClassVar[int] = 65536

    @property
    def start_rows(self) -> int:
        """Rows per micro-batch the loaders are built with: --batch-size, else `cpu_rows` (the trainer's batch plan
        may change the training loader's)."""
        return self.batch_size or self.cpu_rows

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tokens_per_batch != "auto" and not (isinstance(self.tokens_per_batch, int)
                                                    and self.tokens_per_batch >= 1):
            raise ValueError(f"--tokens-per-batch is auto or a positive number of tokens, got "
                             f"{self.tokens_per_batch!r}")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations moves what checkpointed layers save: it needs gradient "
                             "checkpointing on (--gradient-checkpointing)")
        if not 0 <= self.decay_ratio <= 1:
            raise ValueError(f"--decay-ratio is a share of the steps, in [0, 1]: got {self.decay_ratio}")
        if self.optimizer == "muon" and self.trains_adapters:
            raise ValueError("--optimizer muon is for whole models (pretrain, sft, dpo --init): LoRA's low-rank A / B "
                             "factors are not the hidden matrices Muon orthogonalizes; use --optimizer adamw")


@dataclass(kw_only=True)
class SFTDataConfig:
    """How conversations become packed rows (sft, lora)."""

    max_seq_length: int = option(512, "tokens per packed row")
    skip_overlength: bool = option(False, "drop examples longer than --max-seq-length instead of truncating them")
    train_on_prompt: bool = option(False, "learn the prompt tokens too (no masking)")


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    data: str = option(help="prepared data directory (train-*.parquet, valid-*)", required=True)
    tokenizer: str = option(help="tokenizer directory", required=True)
    preset: str = option("small", "model shape", choices=list(PRESETS))
    init: str | None = option(None, "continue pretraining from this model directory")
    seq_len: int = option(512, "tokens per packed row")
    document_masking: bool = option(False, "attention stays inside each document of a packed row (variable-length "
                                           "attention on a GPU; a mask, slower, on the CPU)")
    untie_embeddings: bool = option(False, "a new model's output head is a matrix of its own, not the input "
                                           "embedding (config.json: tie_word_embeddings false)")
    zero_init_residual: bool = option(False, "a new model's residual projections (o_proj, down_proj) start at "
                                             "zero, so every block starts as the identity")
    z_loss: float = option(0.0, "z-loss coefficient (PaLM: 1e-4): the training loss adds it x logsumexp(logits)^2 "
                                "per token, keeping the softmax normalizer near 1; evaluations report plain "
                                "cross-entropy")
    cache_dir: str | None = option(None, "token cache location; unset = DATA/.cache")
    resize_embeddings: bool = option(False, "with --init: grow the embedding for a tokenizer with added tokens")
    out_dir: str = "runs/pretrain"
    lr: float = 6e-4
    warmup_steps: int = 200
    gpu_tokens_per_batch: ClassVar[int] = 131072

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z_loss < 0:
            raise ValueError(f"--z-loss must be >= 0, got {self.z_loss}")
        if self.init and (self.untie_embeddings or self.zero_init_residual):
            raise ValueError("--untie-embeddings and --zero-init-residual shape a new model: with --init the model "
                             "keeps its own head and weights")


@dataclass(kw_only=True)
class SFTConfig(SFTDataConfig, TrainConfig):
    init: str = option(help="model directory to fine-tune (e.g. runs/pretrain/latest)", required=True)
    data: str = option(help="prepared data directory (its train/valid splits)", required=True)
    tokenizer: str | None = option(None, "tokenizer directory; unset = the --init directory")
    template: str | None = option(None, "chat template; unset = the tokenizer's own", choices=TEMPLATE_CHOICES)
    resize_embeddings: bool = option(False, "grow the embedding for a --tokenizer with tokens added to the model's")
    out_dir: str = "runs/sft"
    lr: float = 1e-4
    warmup_steps: int = 50
    epochs: float = 2.0
    # a fine-tune of fewer optimizer steps rarely learns the chat format: warned (trainer/loop.py shortfalls)
    min_steps_to_learn = 100


@dataclass(kw_only=True)
class LoraAdapterConfig:
    """LoRA / QLoRA adapters on a frozen base (lora, dpo --lora)."""

    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.05, "dropout on the LoRA input")
    targets: str = option("q_proj,v_proj", "comma-separated module names (q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                           "up_proj,down_proj; Baichuan's W_pack), a regex, or all-linear (never "
                                           "lm_head)")
    rslora: bool = option(False, "scale = alpha / sqrt(r) (rank-stabilized LoRA)")
    qlora: bool = option(False, "quantize the base linears to NF4 (double quantization) while loading")
    dtype: str = option("auto", "base weights dtype; auto = bfloat16 on a GPU, float32 on the CPU",
                        choices=["auto", "float32", "bfloat16"])


@dataclass(kw_only=True)
class LoraConfig(SFTDataConfig, LoraAdapterConfig, TrainConfig):
    base: str = option(help="base model directory (ours, Llama, Qwen2/Qwen1.5, Baichuan)", required=True)
    data: str = option(help="instruction data file or directory", required=True)
    format: str = option("alpaca", "record format of --data", choices=RECORD_FORMATS)
    eval_data: str | None = option(None, "optional held-out file in the same format")
    template: str = option("chatml", "chat template", choices=TEMPLATE_CHOICES)
    tokenizer: str | None = option(None, "tokenizer directory; unset = --base")
    init_adapter: str | None = option(None, "start from this adapter instead of fresh LoRA layers")
    min_steps_to_learn = 100  # as SFT's
    max_seq_length: int = 2048
    out_dir: str = "runs/lora"
    lr: float = 2e-4
    warmup_steps: int = 20
    epochs: float = 2.0
    weight_decay: float = 0.0
    save_every: int = 200
    save_total_limit: int = 2
    trains_adapters = True
    cpu_rows: ClassVar[int] = 4
    gpu_tokens_per_batch: ClassVar[int] = 32768


@dataclass(kw_only=True)
class DPOConfig(LoraAdapterConfig, TrainConfig):
    init: str | None = option(None, "model directory to train whole (e.g. runs/sft/latest)")
    base: str | None = option(None, "with --lora: the frozen base model directory (ours, Llama, Qwen2/Qwen1.5, "
                                    "Baichuan)")
    lora: bool = option(False, "train LoRA adapters on --base; the reference is the base with the adapters disabled")
    data: str = option(help="preference pairs: a JSON / JSON-lines / parquet file or a folder of them (sharegpt, "
                            "alpaca, prompt/chosen/rejected, question/response_chosen/response_rejected, chosen/"
                            "rejected message lists), or a prepared folder of train-* / valid-* shards", required=True)
    eval_data: str | None = option(None, "held-out pairs for evaluation (any format of --data)")
    valid_fraction: float = option(0.05, "share of --data held out for evaluation when there is no --eval-data or "
                                         "valid-* shard (0: none)")
    ref: str | None = option(None, "reference model directory; unset = --init, frozen (not with --lora)")
    precompute_ref: bool = option(False, "score every pair with the reference once before training, then free it")
    beta: float = option(0.1, "how far from the reference the policy may go (larger: closer); IPO's tau")
    loss: str = option("sigmoid", "sigmoid (DPO), ipo, or hinge (SLiC)", choices=DPO_LOSSES)
    label_smoothing: float = option(0.0, "with --loss sigmoid: the assumed share of flipped labels, in [0, 0.5) "
                                         "(conservative DPO)")
    template: str | None = option(None, "chat template; unset = the tokenizer's own", choices=TEMPLATE_CHOICES)
    tokenizer: str | None = option(None, "tokenizer directory; unset = the model's (--init or --base)")
    max_seq_length: int = option(512, "tokens per sequence (prompt + answer); the two of a pair share a row")
    skip_overlength: bool = option(False, "drop pairs longer than --max-seq-length instead of cutting the answers")
    dropout: float = 0.0  # a dropped-out policy would be scored against an intact reference (TRL turns it off too)
    eval_at_start: bool = True
    out_dir: str = "runs/dpo"
    lr: float = 5e-6
    warmup_steps: int = 10
    epochs: float = 1.0
    weight_decay: float = 0.0
    cpu_rows: ClassVar[int] = 4
    gpu_tokens_per_batch: ClassVar[int] = 32768

    @property
    def trains_adapters(self) -> bool:
        return self.lora

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora != bool(self.base) or bool(self.init) == bool(self.base):
            raise ValueError("give --init DIR (every weight trains) or --base DIR --lora (adapters on a frozen base)")
        if self.lora and self.ref:
            raise ValueError("--ref is for --init runs: a LoRA run's reference is its base with the adapters disabled")


@dataclass(kw_only=True)
class MergeConfig:
    base: str = option(help="base model directory", required=True)
    adapter: str = option(help="adapter directory (ours or PEFT's)", required=True)
    out: str = option(help="merged model directory to write", required=True)
    dtype: str = option("bfloat16", "dtype of the merged weights", choices=["float32", "bfloat16", "float16"])


@dataclass(kw_only=True)
class DemoConfig:
    out: str = option("runs/demo", "output directory (data, tokenizer, runs)")
    vocab_size: int = option(4000, "tokenizer vocabulary size")
    pretrain_steps: int = option(300, "pretraining optimizer steps")
    sft_steps: int = option(600, "SFT optimizer steps")
    seed: int = option(42, "random seed")
