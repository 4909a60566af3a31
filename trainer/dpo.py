"""Direct preference optimization (Rafailov et al., 2023): the loss, and the policy's and the reference's
log-probabilities of the answers, as an objective for the one training loop (trainer/loop.py).

For a pair (x, chosen y_w, rejected y_l), log-probabilities summed over the answer's tokens (the prompt masked, the
end-of-turn token counted), and the log-ratios r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise:

    sigmoid   -(1 - e) log sigmoid(beta (r_w - r_l)) - e log sigmoid(-beta (r_w - r_l))   (e: --label-smoothing, cDPO)
    hinge     max(0, 1 - beta (r_w - r_l))                                                  (SLiC)
    ipo       (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2                                  (IPO, per-token ratios)

The rewards are beta r_w and beta r_l; margins their difference; accuracies the share of pairs whose chosen reward
is the larger; logps the policy's summed log-probabilities. These are TRL DPOTrainer's definitions, loss for loss
(tests/test_dpo.py compares losses, rewards and gradients with its own).

Both answers of a pair lie side by side in one packed row (trainer/data.py `PairLoader`), so one forward scores both.
The reference is a frozen model (the starting one, or --ref), or for LoRA the policy itself with its adapters
disabled (no second copy of the base); it runs under no_grad for every batch, or once for every pair before training
(--precompute-ref), after which batches carry its log-probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.lora import adapters_disabled
from model.loss import IGNORE_INDEX, linear_log_probs
from model.transformer import Transformer

from .config import DPO_LOSSES
from .data import PairLoader

STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected")

Batch = dict[str, torch.Tensor]
Reference = Callable[[nn.Module, Batch], torch.Tensor]  # (policy, batch) -> [2P] summed log-probs


class TokenLogProbs(Transformer):
    """The decoder as a scorer: given labels, its forward returns each labelled token's log-probability [B, T] in
    fp32 (0 elsewhere) instead of the mean cross-entropy, through the head fused the same way (model/loss.py), so no
    [B, T, vocab] logits exist. Going through forward keeps DDP's and FSDP's hooks in the path."""

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_log_probs(hidden, self.lm_head.weight, labels, self.loss_chunk_logits)


def as_scorer(model: Transformer) -> Transformer:
    """`model` made a `TokenLogProbs` in place (its weights, config and everything else unchanged)."""
    model.__class__ = TokenLogProbs
    return model


def per_sequence(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    """[2P]: per-position `values` [B, T] summed over each of the batch's sequences (chosen answer of pair p at 2p,
    rejected at 2p + 1)."""
    total = values.new_zeros(2 * len(batch["pair_ids"]))
    return total.index_add(0, batch["sequence_ids"].flatten(), values.flatten())


def sequence_log_probs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[2P]: each answer's log-probability, summed over its tokens."""
    return per_sequence(batch, model(batch["input_ids"], batch["labels"], segment_ids=batch["segment_ids"]))


def answer_lengths(batch: Batch) -> torch.Tensor:
    """[P, 2]: the number of tokens of each answer."""
    return per_sequence(batch, (batch["labels"] != IGNORE_INDEX).float()).view(-1, 2)


@dataclass
class FrozenReference:
    """A separate frozen model: the starting model, or --ref."""

    model: nn.Module

    @torch.no_grad()
    def __call__(self, policy: nn.Module, batch: Batch) -> torch.Tensor:
        return sequence_log_probs(self.model, batch)


@torch.no_grad()
def base_reference(policy: nn.Module, batch: Batch) -> torch.Tensor:
    """The policy with its LoRA adapters disabled: its frozen base."""
    with adapters_disabled(policy):
        return sequence_log_probs(policy, batch)


@dataclass(frozen=True)
class PreferenceLoss:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {self.loss!r}; known: {', '.join(DPO_LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label smoothing is for the sigmoid loss (conservative DPO), not {self.loss}")

    def __call__(self, policy: torch.Tensor, reference: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair loss [P], rewards [P, 2]) from summed log-probs [P, 2] (chosen, rejected) and answer lengths."""
        ratios = policy - reference
        delta = ratios[:, 0] - ratios[:, 1]
        if self.loss == "sigmoid":
            e = self.label_smoothing
            losses = -(1 - e) * F.logsigmoid(self.beta * delta) - e * F.logsigmoid(-self.beta * delta)
        elif self.loss == "hinge":
            losses = torch.relu(1 - self.beta * delta)
        else:
            per_token = ratios / lengths.clamp(min=1)
            losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * self.beta)) ** 2
        return losses, self.beta * ratios.detach()


@dataclass
class DPOObjective:
    """The loop's objective (trainer/loop.py `Objective`): the mean preference loss over a batch's pairs; its
    statistics are `STATS` summed over them."""

    loss: PreferenceLoss
    reference: Reference | None  # None once every batch carries precomputed `ref_logps`
    unit = "pairs"
    stat_names = STATS

    def units(self, batch: Batch) -> int:
        return len(batch["pair_ids"])

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # the reference first: its no_grad temporaries are gone before the policy's activations are made
        reference = batch["ref_logps"] if "ref_logps" in batch else self.reference(model, batch).view(-1, 2)
        policy = sequence_log_probs(model, batch).view(-1, 2)
        losses, rewards = self.loss(policy, reference, answer_lengths(batch))
        chosen, rejected = rewards.unbind(1)
        logps = policy.detach()
        stats = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).float().sum(),
                             logps[:, 0].sum(), logps[:, 1].sum()]).float()
        return losses.mean(), stats

    def eval_metrics(self, loss: float, stats: list[float]) -> dict[str, float]:
        return {"loss": loss, **dict(zip(STATS, stats))}


def precompute_reference(objective: DPOObjective, model: nn.Module, loaders: list[PairLoader],
                         autocast: Callable) -> None:
    """Score every pair of `loaders` with the objective's reference once (`model`: the prepared policy), so that no
    reference runs while training; the frozen reference model, if any, is let go."""
    device = next(model.parameters()).device

    def score(batch: Batch) -> torch.Tensor:
        with autocast():
            return objective.reference(model, {k: v.to(device) for k, v in batch.items()}).view(-1, 2)
    model.eval()
    for loader in loaders:
        loader.precompute_reference(score)
    model.train()
    objective.reference = None
