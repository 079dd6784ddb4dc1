"""What the losses compute, as plain values: the allowed values of every loss knob and GRPO's objective, one object
the policy loss takes. Free of torch and of the config layer: `thinkforge.losses` implements these, the stage
schemas validate against them, and composing a config imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
#: clip: PPO's clipped token ratio; gspo: the clipped ratio of the sequence (GSPO's length-normalised geometric
#: mean); cispo: MiniMax-M1's clipped importance weight, detached, times log pi
SURROGATES = ("clip", "gspo", "cispo")
#: sequence_mean: each sequence's token mean, then the mean over sequences (DeepSeek-R1's GRPO); token_mean: the sum
#: over every completion token / their number (DAPO); constant: the sum / (sequences x max completion length)
#: (Dr. GRPO)
AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
#: the losses' names elsewhere (TRL's `loss_type`, DESIGN.md's `grpo_loss`): surrogate and aggregation
LOSS_TYPES = {
    "grpo": ("clip", "sequence_mean"),
    "dapo": ("clip", "token_mean"),
    "dr_grpo": ("clip", "constant"),
    "cispo": ("cispo", "token_mean"),
}


@dataclass(frozen=True)
class PolicyObjective:
    """GRPO's per-token objective: a surrogate of the policy ratio, clipped to [1 - epsilon_low, 1 + epsilon_high]
    (with a negative advantage's ratio capped at `delta`, INTELLECT-2's two-sided clip), plus `beta` times a KL
    estimate to the reference, aggregated over the batch."""

    surrogate: str = "clip"
    aggregation: str = "token_mean"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    delta: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.surrogate, SURROGATES, "surrogate"),
            (self.aggregation, AGGREGATIONS, "aggregation"),
            (self.kl_estimator, KL_ESTIMATORS, "kl_estimator"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError("epsilon_low, epsilon_high and beta must be >= 0")
        if self.delta is not None and (self.surrogate == "cispo" or self.delta <= 1 + self.epsilon_high):
            raise ValueError("delta caps a clipped ratio above 1 + epsilon_high; cispo has no such ratio")

    @classmethod
    def of_loss_type(cls, loss_type: str, **knobs: float | str | None) -> PolicyObjective:
        """The objective a named loss (`grpo`, `dapo`, `dr_grpo`, `cispo`) stands for."""
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
        surrogate, aggregation = LOSS_TYPES[loss_type]
        return cls(surrogate=surrogate, aggregation=aggregation, **knobs)  # type: ignore[arg-type]

    @property
    def sequence_ratio(self) -> bool:
        """GSPO: one ratio per sequence instead of one per token."""
        return self.surrogate == "gspo"
