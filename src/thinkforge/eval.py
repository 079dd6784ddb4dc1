"""Scoring rollouts on held-out prompts: accuracy, how often the model stops by itself, how long it talks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from thinkforge.rewards.math import math_accuracy
from thinkforge.rollout.base import Rollout

Verifier = Callable[[str, str], float]


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


def score_rollouts(groups: Sequence[Sequence[Rollout]], golds: Sequence[str], verifier: Verifier = math_accuracy) -> HeldOutSums:
    sums = HeldOutSums()
    for rollouts, gold in zip(groups, golds):
        for rollout in rollouts:
            sums.samples += 1
            sums.correct += verifier(rollout.text, gold)
            sums.finished += rollout.finished
            sums.tokens += len(rollout.token_ids)
    return sums
