"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine schedule to `min_lr_ratio`."""

from __future__ import annotations

import logging
import math

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from thinkforge.config import ModelConfig, OptimConfig

log = logging.getLogger(__name__)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(policy: nn.Module, optim: OptimConfig, total_steps: int) -> OptimizerLRSchedulerConfig:
    """Lightning's optimizer config: AdamW over the trainable parameters, stepped per optimizer step, its schedule
    decaying over `total_steps`."""
    decay = [p for p in policy.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup_steps=optim.warmup_steps, total_steps=total_steps, min_ratio=optim.min_lr_ratio
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def warn_of_demo_scale_settings(policy: nn.Module, optim: OptimConfig, model: ModelConfig, max_steps: int) -> None:
    """The default learning rate and weight decay (OptimConfig) suit the tiny demo model trained from scratch; a
    pretrained model that gets them unchanged is usually wrecked in a few steps, so say so. A warm-up as long as
    the run never reaches its learning rate."""
    if optim.warmup_steps >= max_steps:
        log.warning(
            "optim.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches optim.lr=%g "
            "(lower optim.warmup_steps)",
            optim.warmup_steps,
            max_steps,
            optim.lr,
        )
    parameters = sum(p.numel() for p in policy.parameters())  # a DTensor counts its global size
    if model.name_or_path and parameters >= 50e6 and optim.lr >= 1e-3:
        log.warning(
            "optim.lr=%g and optim.weight_decay=%g are the tiny demo model's (the defaults); a pretrained "
            "model of %.0fM parameters is usually fine-tuned at 1e-6 to 2e-5 with weight decay 0 to 0.01: "
            "set optim.lr and optim.weight_decay",
            optim.lr,
            optim.weight_decay,
            parameters / 1e6,
        )
