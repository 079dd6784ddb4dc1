"""A deterministic multi-step arithmetic word-problem task: the embedded default data.

Each problem is a story of `level` operations on one quantity, with a step-by-step `<think>` trace and a `\\boxed{}`
integer answer; `max_number` bounds the starting quantity and every amount added, so operand size (the arithmetic a
small model must memorise) is a difficulty knob separate from the number of steps. A problem belongs to the test
split exactly when a hash of its prompt says so, so train and test never share a prompt, whatever seed or size
either was generated with.

Two knobs shape how solutions are written, the habits a corpus teaches. `answer_only_fraction`: a share of the
solutions state the answer with an empty `<think>` block; a small model cannot compute a multi-step answer at once,
so it learns two habits, worked steps (mostly right) and blurting (mostly wrong), and samples either.
`boxed_fraction`: the share that box the answer, the rest end "The answer is 12." as raw corpora do. Which
solutions get which follows a hash of the prompt, so the rest of the corpus does not change with the fractions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

NAMES = (
    "Ava",
    "Ben",
    "Cara",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ian",
    "Jo",
    "Kai",
    "Lea",
    "Max",
    "Nia",
    "Omar",
    "Pia",
)
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


def _operation(
    rng: random.Random, value: int, name: str, item: str, level: int, max_number: int
) -> tuple[str, str, int]:
    """One story sentence, its trace line, and the new value; harder levels unlock * and /."""
    kinds = (
        ["add", "sub"] + (["mul"] if level >= 3 and value <= 1.5 * max_number else []) + (["div"] if level >= 4 else [])
    )
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


def hashed_share(prompt: str, what: str, fraction: float) -> bool:
    """Whether `prompt` falls into the `fraction` of problems that get `what`: a hash, so the same prompt always
    does, whatever else was generated, and the choice is independent of everything the model can see."""
    digest = hashlib.sha256(f"{what}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < round(fraction * 1000)


def solution(prompt: str, trace: list[str], answer: int, *, answer_only_fraction: float, boxed_fraction: float) -> str:
    """`<think>` with the worked steps (or nothing, for an answer-only solution), then the final answer."""
    thinking = "" if hashed_share(prompt, "answer-only", answer_only_fraction) else "\n".join(trace) + "\n"
    final = "\\boxed{" + str(answer) + "}" if hashed_share(prompt, "boxed", boxed_fraction) else str(answer)
    return "<think>\n" + thinking + "</think>\nThe answer is " + final + "."


def make_problem(
    rng: random.Random,
    level: int,
    max_number: int = DEFAULT_MAX_NUMBER,
    answer_only_fraction: float = 0.0,
    boxed_fraction: float = 1.0,
) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_number)
    story, trace = [f"{name} has {value} {item}."], []
    for _ in range(level):
        sentence, step, value = _operation(rng, value, name, item, level, max_number)
        story.append(sentence)
        trace.append(step)
    story.append(f"How many {item} does {name} have now?")
    prompt = " ".join(story)
    completion = solution(
        prompt, trace, value, answer_only_fraction=answer_only_fraction, boxed_fraction=boxed_fraction
    )
    return Problem(prompt, completion, str(value), level)


def generate(
    split: str,
    count: int,
    *,
    min_level: int = 1,
    max_level: int = 3,
    max_number: int = DEFAULT_MAX_NUMBER,
    answer_only_fraction: float = 0.0,
    boxed_fraction: float = 1.0,
    seed: int = 0,
) -> list[Problem]:
    """`count` distinct problems of `split`, levels cycling from min_level to max_level."""
    if max_number < 2:
        raise ValueError(f"max_number must be at least 2, got {max_number}")
    if not (0 <= answer_only_fraction <= 1 and 0 <= boxed_fraction <= 1):
        raise ValueError(
            f"answer_only_fraction and boxed_fraction must be in [0, 1], got {answer_only_fraction}, {boxed_fraction}"
        )
    rng = random.Random(f"thinkforge-synthetic-{seed}-{split}")
    return distinct_problems(
        split,
        count,
        min_level,
        max_level,
        lambda level: make_problem(rng, level, max_number, answer_only_fraction, boxed_fraction),
    )


class Drawn(Protocol):
    @property
    def prompt(self) -> str: ...


P = TypeVar("P", bound=Drawn)


def distinct_problems(split: str, count: int, min_level: int, max_level: int, draw: Callable[[int], P]) -> list[P]:
    """`count` problems of `split` with distinct prompts, levels cycling from min_level to max_level; `draw(level)`
    makes one (the math task's or the coding task's)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_level <= max_level <= MAX_LEVEL:
        raise ValueError(f"need 1 <= min_level <= max_level <= {MAX_LEVEL}, got {min_level}..{max_level}")
    levels = list(range(min_level, max_level + 1))
    problems: list[P] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise RuntimeError(f"could not find {count} distinct {split} problems at levels {levels}")
        problem = draw(levels[len(problems) % len(levels)])
        if problem.prompt in seen or split_of(problem.prompt) != split:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def wrong_answer_pairs(count: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Preference rows of known quality: a problem's right trace as chosen, the same trace with its boxed answer
    off by one as rejected. For DPO checks that need no model to build pairs."""
    rows = []
    for problem in generate("train", count, seed=seed):
        wrong = problem.completion.replace(
            "\\boxed{" + problem.answer + "}", "\\boxed{" + str(int(problem.answer) + 1) + "}"
        )
        rows.append({"prompt": problem.prompt, "chosen": problem.completion, "rejected": wrong})
    return rows
