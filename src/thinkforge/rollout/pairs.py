"""Rollout DPO pairs: k sampled completions per prompt, each verified; a verified-correct one is paired with an
incorrect one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from thinkforge.rollout.base import Rollout

Verifier = Callable[[str, str], float]


def pair_rollouts(
    groups: Sequence[Sequence[Rollout]],
    prompts: Sequence[str],
    golds: Sequence[str],
    verifier: Verifier,
    *,
    prompt_indices: Sequence[int] | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One pair per prompt with at least one correct and one incorrect sample; the rest are counted, not paired.

    Each side records whether it `finished` (ended with an end token): a truncated sample is trained as it was
    sampled, without an end token it never produced. `provenance` (source model, seed, ...) is copied into every
    pair beside the prompt's index and the samples chosen.
    """
    pairs: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    indices = range(len(prompts)) if prompt_indices is None else prompt_indices
    for index, prompt, gold, rollouts in zip(indices, prompts, golds, groups):
        scores = [verifier(rollout.text, gold) for rollout in rollouts]
        correct = [i for i, score in enumerate(scores) if score >= 1.0]
        incorrect = [i for i, score in enumerate(scores) if score < 1.0]
        if not correct:
            counts["no_correct"] += 1
            continue
        if not incorrect:
            counts["no_incorrect"] += 1
            continue
        counts["pairs"] += 1
        chosen, rejected = rollouts[correct[0]], rollouts[incorrect[0]]
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen.text,
                "rejected": rejected.text,
                "chosen_finished": chosen.finished,
                "rejected_finished": rejected.finished,
                "answer": gold,
                "provenance": {
                    **(provenance or {}),
                    "prompt_index": index,
                    "chosen_sample": correct[0],
                    "rejected_sample": incorrect[0],
                    "num_correct": len(correct),
                    "num_samples": len(rollouts),
                },
            }
        )
    return pairs, counts
