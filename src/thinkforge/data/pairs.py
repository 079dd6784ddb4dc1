"""Rollout DPO pairs: sample k completions per prompt, verify each, pair a verified-correct one with an incorrect one."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

from thinkforge.rollout.base import RolloutEngine, SamplingConfig

Verifier = Callable[[str, str], float]


def build_rollout_pairs(
    engine: RolloutEngine,
    prompts: Sequence[str],
    rendered_prompts: Sequence[str],
    golds: Sequence[str],
    sampling: SamplingConfig,
    verifier: Verifier,
    *,
    seed: int,
    source_model: str,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One pair per prompt with at least one correct and one incorrect sample; the rest are counted, not paired."""
    groups = engine.generate(rendered_prompts, sampling, seed=seed)
    pairs, counts = [], Counter()
    for index, (prompt, gold, rollouts) in enumerate(zip(prompts, golds, groups)):
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
        pairs.append(
            {
                "prompt": prompt,
                "chosen": rollouts[correct[0]].text,
                "rejected": rollouts[incorrect[0]].text,
                "answer": gold,
                "provenance": {
                    "source_model": source_model,
                    "prompt_index": index,
                    "chosen_sample": correct[0],
                    "rejected_sample": incorrect[0],
                    "num_correct": len(correct),
                    "num_samples": len(rollouts),
                    "temperature": sampling.temperature,
                    "seed": seed,
                },
            }
        )
    return pairs, counts
