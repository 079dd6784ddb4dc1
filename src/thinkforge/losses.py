"""Pure loss functions: log-probs (from `CausalLM`) in, losses out.

The stages use the sum forms (`causal_lm_loss`, `dpo_loss_sum`, `policy_loss_sum`), which return `LossSum`: the loss
summed over its units and how many units that is. `dpo_loss` and `grpo_loss` are the same losses as means, with
DESIGN.md's signatures; GRPO's objective travels as one `PolicyObjective` (`thinkforge.objectives`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from thinkforge.data.packing import IGNORE_INDEX
from thinkforge.objectives import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    DPO_LOSS_TYPES,
    KL_ESTIMATORS,
    ROLLOUT_CORRECTIONS,
    PolicyObjective,
)


class LossSum(NamedTuple):
    """What every loss returns: the loss and its metrics summed over the loss's units (target tokens, pairs,
    sequences, ...), and how many units that is. The stage adds these up over micro-batches and ranks and divides
    once by the global count, which makes the loss the exact mean over the global batch."""

    total: torch.Tensor
    units: torch.Tensor
    metrics: dict[str, torch.Tensor]

    def mean(self) -> torch.Tensor:
        return self.total / self.units.clamp(min=1)


def causal_lm_loss(logprobs: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """Negative log-likelihood summed over the target tokens (labels != IGNORE_INDEX)."""
    mask = labels != IGNORE_INDEX
    return LossSum(-(logprobs * mask).sum(), mask.sum(), {})


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on summed completion log-probs [B]; returns the batch-mean loss and per-pair metrics [B].

    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    sigmoid: -(1-ε)·log σ(β·margin) - ε·log σ(-β·margin);  ipo: (margin - 1/(2β))²;  hinge: relu(1 - β·margin)
    rpo_alpha > 0 adds α·(-chosen / chosen_tokens), the per-token NLL of the chosen answer (iterative RPO, Pang et
    al. 2024): plain DPO on correct-vs-incorrect rollouts lowers the chosen likelihood too, the NLL term prevents it.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}; got {loss_type!r}")
    if rpo_alpha and chosen_tokens is None:
        raise ValueError("rpo_alpha needs chosen_tokens, the number of completion tokens of each chosen answer")
    if chosen_tokens is not None:
        nll = -chosen_logps / chosen_tokens.clamp(min=1)
        losses = losses + rpo_alpha * nll
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    if chosen_tokens is not None:
        metrics["nll/chosen"] = nll.detach()
    return losses.mean(), metrics


def dpo_loss_sum(*logps: torch.Tensor, **options: Any) -> LossSum:
    """`dpo_loss` in the stages' contract: loss and metrics summed over the pairs, the unit."""
    mean, per_pair = dpo_loss(*logps, **options)
    pairs = len(logps[0])
    return LossSum(mean * pairs, torch.tensor(pairs), {name: value.sum() for name, value in per_pair.items()})


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std: float | None = None
) -> torch.Tensor:
    """A_i = r_i − mean of its group, divided by the group's std (`group`), the batch's std (`batch`) or 1 (`none`).

    Groups are contiguous blocks of `group_size` rewards; std is the unbiased estimate, as in DeepSeek-R1's GRPO.
    With several ranks, `batch_std` passes the whole global batch's std: each rank holds only its share.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}; got {scale!r}")
    return centred.reshape(-1)


def loss_units(mask: torch.Tensor, aggregation: str, max_completion_length: int | None = None) -> torch.Tensor:
    """What a policy loss sum is divided by: completion tokens (token_mean), sequences (sequence_mean: each
    sequence's token mean counts once) or sequences x max_completion_length (constant). Known before the forward
    pass, so a step can count its global units first."""
    if aggregation == "token_mean":
        return mask.sum()
    if aggregation == "sequence_mean":
        return torch.tensor(mask.shape[0])
    if aggregation != "constant":
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")
    if max_completion_length is None:
        raise ValueError("the constant aggregation (Dr. GRPO) needs max_completion_length")
    return torch.tensor(mask.shape[0] * max_completion_length)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(π‖π_ref) per token, with log r = log π_ref − log π on samples of π:
    k1 = −log r (unbiased, high variance), k2 = ½(log r)², k3 = r − log r − 1 (unbiased, low variance, ≥ 0)."""
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}; got {estimator!r}")


def importance_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, *, per_sequence: bool = False
) -> torch.Tensor:
    """π/π_old per token [B, T], or GSPO's per sequence (Zheng et al. 2025), the geometric mean of its tokens'
    ratios exp(mean_t log π/π_old), broadcast over the sequence's tokens: one ratio, clipped once, per sequence."""
    log_ratio = logps - old_logps
    if per_sequence:
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(logps)
    return torch.exp(log_ratio)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The completion tokens whose entropy is at least `threshold`: the forking tokens that the "80/20" rule
    (Wang et al. 2025) trains on alone. `entropy_threshold` gives the threshold of a global batch."""
    return (entropy >= threshold) & mask.bool()


def entropy_threshold(entropies: torch.Tensor, quantile: float) -> torch.Tensor:
    """The entropy above which the top `quantile` of `entropies` (all completion tokens of a global batch, 1-D)
    lie: its (1 − quantile) quantile, read off the sorted values (torch.quantile caps its input's size)."""
    if entropies.numel() == 0:
        return entropies.new_tensor(float("inf"))
    ordered = entropies.sort().values
    return ordered[min(int((1 - quantile) * entropies.numel()), entropies.numel() - 1)]


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate + β·KL_k3 per completion token [B, T], aggregated by `loss_type` (grpo: mean over each
    sequence's tokens, then over sequences; dapo: over all completion tokens; dr_grpo: sum / (B ·
    max_completion_length); cispo: MiniMax-M1's surrogate, token mean): the batch mean and its metrics, batch means
    over completion tokens. The named-loss form of `policy_loss_sum` (DESIGN.md's public signature), whose
    `PolicyObjective` takes every other surrogate and knob."""
    objective = PolicyObjective.of_loss_type(loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta)
    mean, token_means, _ = _policy_loss(
        logps, old_logps, advantages, mask, objective, ref_logps=ref_logps, max_completion_length=max_completion_length
    )
    return mean, token_means


def policy_loss_sum(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    objective: PolicyObjective,
    *,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    correction_weights: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> LossSum:
    """GRPO's objective in the stages' contract: the loss and its metrics times its units (`loss_units`).

    Surrogate with ρ = `importance_ratio` (per token; per sequence for gspo): clip and gspo: −min(ρA, clip(ρ,
    1−ε_low, 1+ε_high)A), with ρ first capped at `delta` in the unclipped term (INTELLECT-2's two-sided clip: a
    negative advantage's loss stops growing past ρ = δ; the same as a dual-clip constant c = δ); cispo (MiniMax-M1):
    −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·log π, a gradient through every token. Then + β·KL (`kl_penalty`).
    `correction_weights` [B, T] (from `rollout_correction`) scale each token's surrogate: the importance weight of
    the trainer's policy over the sampler's. `entropy_mask` [B, T] (`high_entropy_mask`) keeps the surrogate of the
    high-entropy tokens alone; the normalisation stays over all completion tokens, as does the KL term.
    """
    mean, token_means, units = _policy_loss(
        logps,
        old_logps,
        advantages,
        mask,
        objective,
        ref_logps=ref_logps,
        max_completion_length=max_completion_length,
        correction_weights=correction_weights,
        entropy_mask=entropy_mask,
    )
    return LossSum(mean * units, units, {name: value * units for name, value in token_means.items()})


def _policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    objective: PolicyObjective,
    *,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    correction_weights: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The batch mean, the token-mean metrics and the units of `policy_loss_sum`."""
    units = loss_units(mask, objective.aggregation, max_completion_length).to(logps.device)
    mask = mask.to(logps.dtype)
    ratio = importance_ratio(logps, old_logps, mask, per_sequence=objective.sequence_ratio)
    advantage = advantages.unsqueeze(-1).to(logps.dtype)
    clipped_ratio = torch.clamp(ratio, 1 - objective.epsilon_low, 1 + objective.epsilon_high)
    if objective.surrogate == "cispo":
        per_token = -clipped_ratio.detach() * advantage * logps
    else:
        unclipped = (ratio if objective.delta is None else ratio.clamp(max=objective.delta)) * advantage
        per_token = -torch.minimum(unclipped, clipped_ratio * advantage)
    if correction_weights is not None:
        per_token = per_token * correction_weights.to(per_token.dtype).detach()
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    tokens = mask.sum().clamp(min=1)
    token_means: dict[str, torch.Tensor] = {}
    if objective.beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = kl_penalty(logps, ref_logps, objective.kl_estimator)
        per_token = per_token + objective.beta * kl
        token_means["kl"] = (kl * mask).sum().detach() / tokens
    if objective.aggregation == "sequence_mean":
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        total = (per_token * mask).sum()
    low = (ratio < 1 - objective.epsilon_low) & (advantage < 0)
    high = (ratio > 1 + objective.epsilon_high) & (advantage > 0)
    token_means["clip_fraction/low"] = (low * mask).sum().detach() / tokens
    token_means["clip_fraction/high"] = (high * mask).sum().detach() / tokens
    token_means["ratio/mean"] = (ratio * mask).sum().detach() / tokens
    if entropy_mask is not None:
        token_means["entropy_mask/fraction"] = (entropy_mask * mask).sum() / tokens
    return total / units.clamp(min=1), token_means, units


def rollout_correction(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, *, mode: str, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling for a sampler that is not exactly the trainer's policy (vLLM's kernels, bf16):
    weights [B, T] of π_trainer/π_sampler per token (`token_*`) or per sequence, the product over its tokens
    (`sequence_*`). `*_truncate` caps a weight at `cap` (TIS); `*_mask` drops tokens or sequences whose weight
    exceeds it (weight 0) and keeps the others' weights. `none`: weights of 1. Metrics over completion tokens:
    the weights' mean, min and max and the share masked."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"mode must be one of {ROLLOUT_CORRECTIONS}; got {mode!r}")
    mask = mask.bool()
    log_ratio = ((trainer_logps - sampler_logps) * mask).detach()
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
    ratio = torch.exp(log_ratio) if mode != "none" else torch.ones_like(log_ratio)
    masked = (ratio > cap) & mask if mode.endswith("_mask") else torch.zeros_like(mask)
    weights = ratio.clamp(max=cap) if mode.endswith("_truncate") else ratio.masked_fill(masked, 0.0)
    tokens = mask.sum().clamp(min=1)
    inside = weights[mask] if mask.any() else weights.new_ones(1)
    return weights * mask, {
        "rollout_correction/mean": (weights * mask).sum() / tokens,
        "rollout_correction/min": inside.min(),
        "rollout_correction/max": inside.max(),
        "rollout_correction/masked_fraction": masked.sum() / tokens,
    }


def is_extreme(metric: str) -> bool:
    """A metric that is a min or max: combined across micro-batches and ranks by min/max, not summed."""
    return metric.endswith(("/min", "/max"))
