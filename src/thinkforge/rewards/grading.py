"""Grading a completion against its row's gold, whatever the domain: a math answer through the verifier's worker
pool, code through its tests in the sandbox. Rewards, held-out scores and `thinkforge-eval` all grade here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from thinkforge.rewards.code import CodeTests, code_scores_many
from thinkforge.rewards.math import extract_answer, gold_is_parseable, math_accuracy_many

#: a row's gold: the answer of a math problem, or the tests of a coding one
Gold = str | CodeTests


@dataclass(frozen=True)
class Grade:
    #: 1.0/0.0 for a math answer; the share of its tests a solution passed
    score: float
    #: whether there was an answer to grade at all: one the grader could read, or a code block
    answered: bool

    @property
    def correct(self) -> bool:
        return self.score >= 1.0


def gold_json(gold: Gold) -> str | list[Any]:
    """A gold as a JSON file keeps it (samples, pairs, replies): the answer, or the list of tests `CodeTests.parse`
    reads back."""
    return gold.as_json() if isinstance(gold, CodeTests) else gold


def gold_is_usable(gold: Gold) -> bool:
    """Whether a gold can grade anything: tests always can; an answer only when the verifier parses it."""
    return isinstance(gold, CodeTests) or gold_is_parseable(gold)


def grade_many(
    completions: Sequence[str], golds: Sequence[Gold], *, lenient: bool = False, guess: bool = True
) -> list[Grade]:
    """Every completion against its gold; the batch's math checks run at once in the verifier's pool, and its code
    checks in parallel in the sandbox. `lenient` and `guess` are `extract_answer`'s (code: `extract_code`'s)."""
    grades: list[Grade | None] = [None] * len(completions)
    math = [i for i, gold in enumerate(golds) if not isinstance(gold, CodeTests)]
    code = [(i, gold) for i, gold in enumerate(golds) if isinstance(gold, CodeTests)]
    if math:
        texts = [completions[i] for i in math]
        scores = math_accuracy_many(texts, [str(golds[i]) for i in math], lenient=lenient, guess=guess)
        for i, text, score in zip(math, texts, scores):
            grades[i] = Grade(score, extract_answer(text, lenient, guess=guess) is not None)
    if code:
        shares = code_scores_many([completions[i] for i, _ in code], [tests for _, tests in code], lenient=lenient)
        for (i, _), share in zip(code, shares):
            grades[i] = Grade(share or 0.0, share is not None)
    return [grade for grade in grades if grade is not None]


def verify_many(
    completions: Sequence[str], golds: Sequence[Gold], *, lenient: bool = False, guess: bool = True
) -> list[float]:
    """1.0/0.0 per completion: a right answer, or a solution that passes every test."""
    return [float(grade.correct) for grade in grade_many(completions, golds, lenient=lenient, guess=guess)]
