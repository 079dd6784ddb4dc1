"""Pure loss functions and the chunked log-prob op they are fed by. No module state, tensors in, tensors out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from thinkforge.data.packing import IGNORE_INDEX


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() / temperature
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 2048,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position, 0 where the target is IGNORE_INDEX; optionally the entropy (no grad).

    `temperature` divides the logits first: RL must score completions under the distribution that sampled them,
    or its ratio, clipping and KL refer to another policy. Logits exist only `chunk_size` rows at a time, in the
    forward and (recomputed) in the backward, so memory stays O(chunk · vocab) instead of O(tokens · vocab).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive to score samples; got {temperature}")
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, flat_targets.numel(), chunk_size):
        chunk_hidden = flat_hidden[start : start + chunk_size]
        chunk_targets = flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            logprob_chunks.append(
                checkpoint(_chunk_logprobs, chunk_hidden, lm_head_weight, chunk_targets, temperature, use_reentrant=False)
            )
        else:
            logprob_chunks.append(_chunk_logprobs(chunk_hidden, lm_head_weight, chunk_targets, temperature))
        if with_entropy:
            with torch.no_grad():
                entropy_chunks.append(_chunk_entropy(chunk_hidden, lm_head_weight, temperature))
    # masked_fill after view: the outputs must not be views (FSDP2 hooks the backward of module outputs).
    ignored = targets == IGNORE_INDEX
    logprobs = torch.cat(logprob_chunks).view(shape).masked_fill(ignored, 0.0)
    entropy = torch.cat(entropy_chunks).view(shape).masked_fill(ignored, 0.0) if with_entropy else None
    return logprobs, entropy


def causal_lm_loss_sum(logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood and the number of target tokens; the caller divides by the global count."""
    mask = labels != IGNORE_INDEX
    return -(logprobs * mask).sum(), mask.sum()


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
        raise ValueError(f"loss_type must be sigmoid, ipo or hinge; got {loss_type!r}")
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
        raise ValueError(f"scale must be group, batch or none; got {scale!r}")
    return centred.reshape(-1)


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


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
    """Clipped surrogate + β·KL_k3 per completion token [B, T], aggregated by `loss_type`:

    grpo: mean over each sequence's tokens, then over sequences; dapo: sum over tokens / completion tokens in the
    batch; dr_grpo: sum / (B · max_completion_length). Metrics are batch means over completion tokens.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}; got {loss_type!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    advantage = advantages.unsqueeze(-1).to(logps.dtype)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    tokens = mask.sum().clamp(min=1)
    metrics: dict[str, torch.Tensor] = {}
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        log_ratio = ref_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum().detach() / tokens
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / tokens
    else:
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (logps.shape[0] * max_completion_length)
    low = (ratio < 1 - epsilon_low) & (advantage < 0)
    high = (ratio > 1 + epsilon_high) & (advantage > 0)
    metrics["clip_fraction/low"] = (low * mask).sum().detach() / tokens
    metrics["clip_fraction/high"] = (high * mask).sum().detach() / tokens
    metrics["ratio/mean"] = (ratio * mask).sum().detach() / tokens
    return loss, metrics
