"""Grader audit on the user's own gold answers: a correctly formatted answer scores 1, the known ways of gaming a
math grader score 0, and the grader is fast enough for a reward."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from thinkforge.doctor.findings import Finding
from thinkforge.rewards.math import gold_is_parseable, math_accuracy_many
from thinkforge.stages.probe import formatted_answer

Verifier = Callable[[Sequence[str], Sequence[str]], list[float]]


def gaming_shapes(gold: str) -> dict[str, str]:
    """Completions that must score 0 for this gold answer, whatever else the grader accepts."""
    other = "0" if gold.strip() != "0" else "1"
    return {
        "hedged boxes": f"<think>\nmaybe\n</think>\n\\boxed{{{gold}}} or \\boxed{{{other}}}",
        "answer only in <think>": f"<think>\nit is \\boxed{{{gold}}}\n</think>\nI am not sure.",
        "unclosed <think>": f"<think>\nit is \\boxed{{{gold}}}",
    }


def timed_check(verifier: Verifier, text: str, gold: str) -> float:
    started = time.perf_counter()
    verifier([text], [gold])
    return time.perf_counter() - started


def grader_audit(golds: Sequence[str], verifier: Verifier = math_accuracy_many) -> Finding:
    parseable = [gold for gold in golds if gold_is_parseable(gold)]
    skipped = 1 - len(parseable) / max(len(golds), 1)
    formatted = [formatted_answer(gold) for gold in parseable]
    started = time.perf_counter()
    right = verifier(formatted, parseable)
    shapes = [(name, text, gold) for gold in parseable for name, text in gaming_shapes(gold).items()]
    gamed = verifier([text for _, text, _ in shapes], [gold for _, _, gold in shapes])
    seconds = time.perf_counter() - started
    slowest = max(
        (timed_check(verifier, text, gold) for text, gold in zip(formatted[:16], parseable[:16])), default=0.0
    )
    accepted = sum(score >= 1 for score in right) / max(len(parseable), 1)
    gamers = sorted({name for (name, _, _), score in zip(shapes, gamed) if score >= 1})
    measured = (
        f"{len(golds)} golds: {skipped:.0%} unparseable (skipped), formatted gold accepted {accepted:.0%}, "
        f"gaming shapes accepted: {', '.join(gamers) or 'none'}; "
        f"{len(formatted) + len(shapes)} checks in {seconds:.1f} s, "
        f"slowest {slowest * 1e3:.0f} ms"
    )
    if gamers or accepted < 0.99:
        advice = (
            "the reward can be gamed"
            if gamers
            else "correct answers score 0: check data.fields.answer and the gold format"
        )
        return Finding("grader audit", "fail", measured, advice)
    if skipped > 0.05:
        return Finding(
            "grader audit", "warn", measured, "prompts with unparseable gold answers are skipped in training"
        )
    return Finding("grader audit", "pass", measured)
