"""A deterministic multi-step arithmetic word-problem task: the embedded default data.

Each problem is a story of `level` operations on one quantity, with a step-by-step `<think>` trace and a `\\boxed{}`
integer answer; `max_number` bounds the starting quantity and every amount added, so operand size (the arithmetic a
small model must memorise) is a difficulty knob separate from the number of steps. A problem belongs to the test split exactly when a hash of its prompt says so, so train and test
never share a prompt, whatever seed or size either was generated with.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ("Ava", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ian", "Jo", "Kai", "Lea", "Max", "Nia", "Omar", "Pia")
ITEMS = ("apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens", "eggs", "beads")
TEST_FRACTION_PER_MILLE = 100
MAX_LEVEL = 5
DEFAULT_MAX_NUMBER = 20


@dataclass(frozen=True)
class Problem:
    prompt: str
    completion: str
    answer: str
    level: int

    def as_record(self) -> dict[str, object]:
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer, "level": self.level}


def split_of(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_FRACTION_PER_MILLE else "train"


def _operation(rng: random.Random, value: int, name: str, item: str, level: int, max_number: int) -> tuple[str, str, int]:
    """One story sentence, its trace line, and the new value; harder levels unlock * and /."""
    kinds = ["add", "sub"] + (["mul"] if level >= 3 and value <= 1.5 * max_number else []) + (["div"] if level >= 4 else [])
    kind = rng.choice(kinds)
    if kind == "sub" and value < 2:
        kind = "add"
    if kind == "div":
        divisors = [d for d in (2, 3, 4, 5) if value % d == 0 and value > d]
        if not divisors:
            kind = "add"
    if kind == "add":
        amount = rng.randint(1, max_number)
        return f"{name} gets {amount} more {item}.", f"{value} + {amount} = {value + amount}", value + amount
    if kind == "sub":
        amount = rng.randint(1, value - 1)
        return f"{name} gives away {amount} {item}.", f"{value} - {amount} = {value - amount}", value - amount
    if kind == "mul":
        factor = rng.randint(2, 4)
        return f"{name}'s {item} grow {factor} times as many.", f"{value} * {factor} = {value * factor}", value * factor
    divisor = rng.choice(divisors)
    return (
        f"{name} shares the {item} equally among {divisor} friends and keeps one share.",
        f"{value} / {divisor} = {value // divisor}",
        value // divisor,
    )


def make_problem(rng: random.Random, level: int, max_number: int = DEFAULT_MAX_NUMBER) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_number)
    story, trace = [f"{name} has {value} {item}."], []
    for _ in range(level):
        sentence, step, value = _operation(rng, value, name, item, level, max_number)
        story.append(sentence)
        trace.append(step)
    story.append(f"How many {item} does {name} have now?")
    completion = "<think>\n" + "\n".join(trace) + "\n</think>\nThe answer is \\boxed{" + str(value) + "}."
    return Problem(" ".join(story), completion, str(value), level)


def generate(
    split: str, count: int, *, min_level: int = 1, max_level: int = 3, max_number: int = DEFAULT_MAX_NUMBER, seed: int = 0
) -> list[Problem]:
    """`count` distinct problems of `split`, levels cycling from min_level to max_level."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_level <= max_level <= MAX_LEVEL:
        raise ValueError(f"need 1 <= min_level <= max_level <= {MAX_LEVEL}, got {min_level}..{max_level}")
    if max_number < 2:
        raise ValueError(f"max_number must be at least 2, got {max_number}")
    rng = random.Random(f"thinkforge-synthetic-{seed}-{split}")
    levels = list(range(min_level, max_level + 1))
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise RuntimeError(f"could not find {count} distinct {split} problems at levels {levels}")
        problem = make_problem(rng, levels[len(problems) % len(levels)], max_number)
        if problem.prompt in seen or split_of(problem.prompt) != split:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems
