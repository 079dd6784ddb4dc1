"""Reward functions of one sample, and the weighted registry that composes them from config."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from thinkforge.rewards.math import THINK_END, extract_answer, math_accuracy_many


@dataclass(frozen=True)
class Sample:
    completion: str
    gold: str
    num_tokens: int
    truncated: bool
    # Whether the final answer matches the gold one: checked for a whole batch at once, in parallel.
    correct: bool
    # The completion budget it was sampled with (max_completion_length at this step): length rewards scale to it,
    # so a preset works at 96 tokens as at 32K and follows a context-lengthening schedule.
    max_tokens: int


def well_formed(completion: str) -> bool:
    """One `<think>` block that opens the completion and closes once, then a boxed answer after it."""
    return (
        completion.lstrip().startswith("<think>")
        and completion.count("<think>") == 1
        and completion.count(THINK_END) == 1
        and "\\boxed{" in completion.split(THINK_END, 1)[1]
    )


def accuracy_reward(sample: Sample) -> float:
    """DeepScaleR: 1 if the final boxed answer after `</think>` matches the gold answer, else 0."""
    return float(sample.correct)


def format_reward(sample: Sample) -> float:
    """R1-Zero: `<think>…</think>` then an answer."""
    return float(well_formed(sample.completion))


def cosine_length_reward(sample: Sample, *, positive_fraction: float, negative_fraction: float) -> float:
    """Phi-4-reasoning-plus: correct 1.0 → 0.5 as it grows past `positive_fraction` of the budget; wrong −1 (short)
    → −0.5 (long) by `negative_fraction` of it. The paper's 25600 and 3702 of 31744 tokens: 0.806 and 0.117."""
    if sample.truncated:
        return -0.5
    if not well_formed(sample.completion):
        return -1.0
    length, budget = sample.num_tokens, sample.max_tokens
    if sample.correct:
        positive = positive_fraction * budget
        rho = min(1.0, max(length - positive, 0) / max(budget - positive, 1e-9))
        return 0.5 + 0.25 * (1 + math.cos(math.pi * rho))
    rho = min(1.0, length / max(negative_fraction * budget, 1e-9))
    return -0.5 - 0.25 * (1 + math.cos(math.pi * rho))


def repetition_reward(sample: Sample, *, ngram: int = 5, frequent_count: int = 5) -> float:
    """Phi-4: −max(#frequent n-grams / #n-grams, max frequency / (#words / n)); frequent = seen > 5 times."""
    words = sample.completion.split()
    if len(words) < ngram:
        return 0.0
    counts = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    total = sum(counts.values())
    frequent = sum(count for count in counts.values() if count > frequent_count)
    return -max(frequent / total, max(counts.values()) / (len(words) / ngram))


def overlong_reward(sample: Sample, *, cache_fraction: float) -> float:
    """DAPO soft overlong penalty: 0 until the last `cache_fraction` of the budget, then linear to −1, −1 beyond.
    DAPO's 4096-token cache of 20480: 0.2."""
    cache = cache_fraction * sample.max_tokens
    limit = sample.max_tokens - cache
    if sample.num_tokens <= limit:
        return 0.0
    if sample.num_tokens <= sample.max_tokens:
        return (limit - sample.num_tokens) / cache
    return -1.0


REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {
    "math_accuracy": accuracy_reward,
    "format": format_reward,
    "cosine_length": cosine_length_reward,
    "repetition": repetition_reward,
    "overlong": overlong_reward,
}


class RewardModel:
    """Weighted sum of registered reward functions, e.g. {math_accuracy: {weight: 1}, format: {weight: 0.1}}.

    `lenient`: answers also count when stated without a box ("The answer is: 25", "#### 25"), for instruct models
    that never box; hedges and guesses still score 0 (`extract_answer(..., guess=False)`)."""

    #: the reward when `stage.reward` is null: the verified answer alone
    DEFAULT: Mapping[str, Mapping[str, Any]] = {"math_accuracy": {"weight": 1.0}}

    def __init__(self, spec: Mapping[str, Mapping[str, Any]] | None, *, lenient: bool = False) -> None:
        self.lenient = lenient
        spec = self.DEFAULT if spec is None else spec
        if not spec:
            raise ValueError("stage.reward: needs at least one reward function")
        self.functions: dict[str, tuple[float, Callable[[Sample], float]]] = {}
        for name, options in spec.items():
            if name not in REWARD_FUNCTIONS:
                raise ValueError(f"stage.reward.{name}: unknown reward; known: {', '.join(REWARD_FUNCTIONS)}")
            options = dict(options or {})
            weight = float(options.pop("weight", 1.0))
            try:
                function = partial(REWARD_FUNCTIONS[name], **options)
                function(Sample("<think>\nx\n</think>\n\\boxed{1}", "1", 10, False, True, 96))
            except TypeError as error:
                raise ValueError(f"stage.reward.{name}: {error}") from None
            self.functions[name] = (weight, function)

    def __call__(self, sample: Sample) -> tuple[float, dict[str, float]]:
        parts = {name: function(sample) for name, (_, function) in self.functions.items()}
        return sum(self.functions[name][0] * value for name, value in parts.items()), parts

    def score(
        self,
        completions: Sequence[str],
        golds: Sequence[str],
        lengths: Sequence[int],
        truncated: Sequence[bool],
        max_tokens: int,
    ) -> list[tuple[float, dict[str, float]]]:
        """Rewards of a batch; every answer check of the batch runs at once in the verifier's worker pool.

        Each sample's parts also carry `accuracy` (1/0, whatever the reward mix) and `answered` (whether the grader
        found an answer to compare at all), which are logged, never summed.
        """
        correct = [score == 1.0 for score in math_accuracy_many(completions, golds, lenient=self.lenient, guess=False)]
        answered = [extract_answer(text, self.lenient, guess=False) is not None for text in completions]
        scored = [self(Sample(*fields, max_tokens)) for fields in zip(completions, golds, lengths, truncated, correct)]
        return [
            (total, {**parts, "accuracy": float(ok), "answered": float(found)})
            for (total, parts), ok, found in zip(scored, correct, answered)
        ]
