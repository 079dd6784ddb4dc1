"""Training rows from a model's own verified samples: rollout DPO's pairs (a verified-correct sample of a prompt
against an incorrect one) and rejection-sampled SFT's replies (its verified-correct samples alone)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from thinkforge.rewards.grading import Gold, gold_json
from thinkforge.rollout.base import Rollout

#: grades a batch: (completions, golds) -> 1.0/0.0 each
BatchVerifier = Callable[[Sequence[str], Sequence[Gold]], list[float]]


def graded(groups: Sequence[Sequence[Rollout]], golds: Sequence[Gold], verify: BatchVerifier) -> list[list[bool]]:
    """Whether each sample of each prompt's group is verified correct, every check of the batch at once."""
    texts = [rollout.text for group in groups for rollout in group]
    scores = iter(verify(texts, [gold for gold, group in zip(golds, groups) for _ in group]))
    return [[next(scores) >= 1.0 for _ in group] for group in groups]


def pair_rollouts(
    groups: Sequence[Sequence[Rollout]],
    prompts: Sequence[str],
    golds: Sequence[Gold],
    correct: Sequence[Sequence[bool]],
    *,
    prompt_indices: Sequence[int] | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One pair per prompt with at least one correct and one incorrect sample (`correct`: from `graded`); the rest
    are counted, not paired.

    Each side records whether it `finished` (ended with an end token): a truncated sample is trained as it was
    sampled, without an end token it never produced. `provenance` (source model, seed, ...) is copied into every
    pair beside the prompt's index and the samples chosen.
    """
    pairs: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    indices = range(len(prompts)) if prompt_indices is None else prompt_indices
    for index, prompt, gold, rollouts, verdicts in zip(indices, prompts, golds, groups, correct):
        right = [i for i, ok in enumerate(verdicts) if ok]
        wrong = [i for i, ok in enumerate(verdicts) if not ok]
        if not right:
            counts["no_correct"] += 1
            continue
        if not wrong:
            counts["no_incorrect"] += 1
            continue
        counts["pairs"] += 1
        chosen, rejected = rollouts[right[0]], rollouts[wrong[0]]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen.text,
                "rejected": rejected.text,
                "chosen_finished": chosen.finished,
                "rejected_finished": rejected.finished,
                "answer": gold_json(gold),
                "provenance": {
                    **(provenance or {}),
                    "prompt_index": index,
                    "chosen_sample": right[0],
                    "rejected_sample": wrong[0],
                    "num_correct": len(right),
                    "num_samples": len(rollouts),
                },
            }
        )
    return pairs, counts


def verified_replies(
    groups: Sequence[Sequence[Rollout]],
    prompts: Sequence[str],
    golds: Sequence[Gold],
    correct: Sequence[Sequence[bool]],
    *,
    max_per_prompt: int,
    prompt_indices: Sequence[int] | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Rejection sampling: up to `max_per_prompt` distinct verified-correct samples of each prompt, as prompt and
    completion rows. Only finished samples count: SFT teaches the reply's end, which a truncated one never wrote."""
    replies: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    indices = range(len(prompts)) if prompt_indices is None else prompt_indices
    for index, prompt, gold, rollouts, verdicts in zip(indices, prompts, golds, groups, correct):
        kept: dict[str, int] = {}  # each distinct text once, as its first sample
        for sample, (rollout, ok) in enumerate(zip(rollouts, verdicts)):
            if ok and rollout.finished:
                kept.setdefault(rollout.text, sample)
        chosen = list(kept.items())[:max_per_prompt]
        counts["replies"] += len(chosen)
        counts["no_correct"] += not chosen
        counts["correct_unfinished"] += sum(ok and not r.finished for r, ok in zip(rollouts, verdicts))
        replies += [
            {
                "prompt": prompt,
                "completion": text,
                "answer": gold_json(gold),
                "provenance": {
                    **(provenance or {}),
                    "prompt_index": index,
                    "sample": sample,
                    "num_correct": sum(verdicts),
                    "num_samples": len(rollouts),
                },
            }
            for text, sample in chosen
        ]
    return replies, counts
