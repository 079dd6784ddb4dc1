"""The coding side of the synthetic task: the word problems asked as small Python functions, graded by their tests.

A problem is a word problem's story told of a starting quantity `n`: "Write a Python function `apples(n)`: Ava
has n apples. Ava gets 5 more apples. ... Return how many apples Ava has now." Its solution thinks in one line of
arithmetic per step, then writes the function, one statement per step; its `tests` are asserts on three starting
quantities. `level` is the number of steps, as in the math task, and a problem is in the test split exactly when
the math task's hash of its prompt says so.

`buggy_fraction` plays the part of the math task's answer-only habit: that share of the solutions forget the last
step (a hash of the prompt picks which), so a model trained on them writes code that runs but fails its tests that
often, and sampling still finds the complete function: what RL with a code reward can sharpen.
"""

from __future__ import annotations

import functools
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

from thinkforge.data.synthetic import ITEMS, NAMES, distinct_problems, hashed_share

TESTS_PER_PROBLEM = 3


@dataclass(frozen=True)
class CodeProblem:
    prompt: str
    completion: str
    tests: tuple[str, ...]
    level: int

    def as_record(self) -> dict[str, object]:
        return {"prompt": self.prompt, "completion": self.completion, "tests": list(self.tests), "level": self.level}


OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _apply(n: int, step: tuple[str, int]) -> int:
    return OPERATIONS[step[0]](n, step[1])


def _step(rng: random.Random, name: str, item: str, level: int, max_number: int) -> tuple[str, str, int]:
    """One story sentence and the operation it does to `n`; level 3 and up unlock multiplication."""
    sign = rng.choice(["+", "-"] + (["*"] if level >= 3 else []))
    if sign == "+":
        amount = rng.randint(1, max_number)
        return f"{name} gets {amount} more {item}.", sign, amount
    if sign == "-":
        amount = rng.randint(1, max_number)
        return f"{name} gives away {amount} {item}.", sign, amount
    factor = rng.randint(2, 4)
    return f"{name}'s {item} grow {factor} times as many.", sign, factor


def make_problem(rng: random.Random, level: int, max_number: int, buggy_fraction: float = 0.0) -> CodeProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    story, steps = [], []
    for _ in range(level):
        sentence, sign, amount = _step(rng, name, item, level, max_number)
        story.append(sentence)
        steps.append((sign, amount))
    prompt = (
        f"Write a Python function `{item}(n)`: {name} has n {item}. " + " ".join(story) + f" Return how many {item} "
        f"{name} has now."
    )
    inputs = rng.sample(range(1, max_number + 10), TESTS_PER_PROBLEM)
    tests = tuple(f"assert {item}({n}) == {functools.reduce(_apply, steps, n)}" for n in inputs)
    written = steps[:-1] if hashed_share(prompt, "buggy", buggy_fraction) else steps
    body = "".join(f"    n = n {sign} {amount}\n" for sign, amount in written)
    thinking = "".join(f"n {sign} {amount}\n" for sign, amount in written)
    completion = f"<think>\n{thinking}</think>\n```python\ndef {item}(n):\n{body}    return n\n```"
    return CodeProblem(prompt, completion, tests, level)


def generate(
    split: str,
    count: int,
    *,
    min_level: int = 1,
    max_level: int = 3,
    max_number: int = 20,
    buggy_fraction: float = 0.0,
    seed: int = 0,
) -> list[CodeProblem]:
    """`count` distinct problems of `split`, levels cycling from min_level to max_level."""
    rng = random.Random(f"thinkforge-synthetic-code-{seed}-{split}")
    return distinct_problems(
        split, count, min_level, max_level, lambda level: make_problem(rng, level, max_number, buggy_fraction)
    )
