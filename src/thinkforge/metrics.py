"""Scores of sampled completions: held-out sums during training, and the benchmark metrics of `thinkforge-eval`.

Benchmark metrics follow the usual definitions: pass@1 averaged over the k samples of each problem, the unbiased
pass@k estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), and maj@k, a vote over the first k samples' answers
(normalised strings) whose winner is graded by the verifier.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from thinkforge.errors import ConfigError
from thinkforge.rewards.grading import Gold, verify_many
from thinkforge.rewards.math import normalize_answer
from thinkforge.rollout.base import Rollout

# Scores a batch: (completions, golds) -> 1.0/0.0 each.
BatchVerifier = Callable[[Sequence[str], Sequence[Gold]], list[float]]


@dataclass
class HeldOutSums:
    """Sums, so that shards from several ranks add up before dividing."""

    samples: float = 0.0
    correct: float = 0.0
    finished: float = 0.0
    tokens: float = 0.0
    # samples that could call a tool (multi-turn), and their calls
    tool_samples: float = 0.0
    tool_calls: float = 0.0

    def as_list(self) -> list[float]:
        return [self.samples, self.correct, self.finished, self.tokens, self.tool_samples, self.tool_calls]

    def metrics(self) -> dict[str, float]:
        n = max(self.samples, 1.0)
        scores = {"accuracy": self.correct / n, "eos_rate": self.finished / n, "mean_length": self.tokens / n}
        if self.tool_samples:
            scores["tool_calls"] = self.tool_calls / self.tool_samples
        return scores


def score_rollouts(
    groups: Sequence[Sequence[Rollout]], golds: Sequence[Gold], verifier: BatchVerifier = verify_many
) -> tuple[HeldOutSums, list[float]]:
    """The sums over every sample, and each sample's score (groups flattened in order)."""
    flat = [(rollout, gold) for rollouts, gold in zip(groups, golds) for rollout in rollouts]
    scores = verifier([rollout.text for rollout, _ in flat], [gold for _, gold in flat])
    sums = HeldOutSums(
        samples=float(len(flat)),
        correct=float(sum(scores)),
        finished=float(sum(rollout.finished for rollout, _ in flat)),
        tokens=float(sum(len(rollout.token_ids) for rollout, _ in flat)),
        tool_samples=float(sum(bool(rollout.turns) for rollout, _ in flat)),
        tool_calls=float(sum(len(rollout.calls) for rollout, _ in flat)),
    )
    return sums, scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"need 0 <= c <= n and 0 < k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    missing_all = 1.0
    for i in range(n - c + 1, n + 1):
        missing_all *= 1.0 - k / i
    return 1.0 - missing_all


def majority_correct(samples: Sequence[dict[str, Any]]) -> bool:
    """Votes over the samples' extracted answers (unanswered samples abstain); ties go to the earliest answer."""
    keys = [normalize_answer(s["answer"]) if s.get("answer") is not None else None for s in samples]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(key for key in keys if key is not None and votes[key] == top)
    return bool(samples[keys.index(winner)]["correct"])


def summarize(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """Benchmark metrics from per-sample rows (`problem`, `correct`, `answer`, optional `num_tokens`/`finished`)."""
    problems: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        problems.setdefault(row["problem"], []).append(row)
    if not problems:
        raise ValueError("no samples to summarize")
    fewest = min(len(samples) for samples in problems.values())
    summary: dict[str, float] = {"problems": float(len(problems)), "samples": float(len(rows))}
    summary["pass@1"] = sum(sum(s["correct"] for s in p) / len(p) for p in problems.values()) / len(problems)
    too_many = sorted(k for k in set(ks) if k > fewest)
    if too_many:
        raise ConfigError(
            f"ks: pass@k and maj@k need k samples of every problem; some problem has only {fewest}, "
            f"so {too_many} cannot be computed (set ks=[...] to values <= {fewest})"
        )
    for k in sorted(set(ks)):
        summary[f"pass@{k}"] = sum(
            pass_at_k(len(p), sum(bool(s["correct"]) for s in p), k) for p in problems.values()
        ) / len(problems)
        summary[f"maj@{k}"] = sum(majority_correct(p[:k]) for p in problems.values()) / len(problems)
    if all("num_tokens" in row for row in rows):
        summary["mean_length"] = sum(row["num_tokens"] for row in rows) / len(rows)
    if all("finished" in row for row in rows):
        summary["eos_rate"] = sum(bool(row["finished"]) for row in rows) / len(rows)
    return summary
