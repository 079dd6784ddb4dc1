"""Scoring rollouts on held-out prompts: accuracy, how often the model stops by itself, how long it talks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from thinkforge.rewards.math import math_accuracy_many
from thinkforge.rollout.base import Rollout

# Scores a batch: (completions, golds) -> 1.0/0.0 each.
BatchVerifier = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class HeldOutSums:
    """Sums, so that shards from several ranks add up before dividing."""

    samples: float = 0.0
    correct: float = 0.0
    finished: float = 0.0
    tokens: float = 0.0

    def as_list(self) -> list[float]:
        return [self.samples, self.correct, self.finished, self.tokens]

    def metrics(self) -> dict[str, float]:
        n = max(self.samples, 1.0)
        return {"accuracy": self.correct / n, "eos_rate": self.finished / n, "mean_length": self.tokens / n}


def score_rollouts(
    groups: Sequence[Sequence[Rollout]], golds: Sequence[str], verifier: BatchVerifier = math_accuracy_many
) -> HeldOutSums:
    flat = [(rollout, gold) for rollouts, gold in zip(groups, golds) for rollout in rollouts]
    scores = verifier([rollout.text for rollout, _ in flat], [gold for _, gold in flat])
    return HeldOutSums(
        samples=float(len(flat)),
        correct=float(sum(scores)),
        finished=float(sum(rollout.finished for rollout, _ in flat)),
        tokens=float(sum(len(rollout.token_ids) for rollout, _ in flat)),
    )
