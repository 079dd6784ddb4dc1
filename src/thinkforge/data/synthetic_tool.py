"""The tool-use side of the synthetic task: products of two numbers of `level + 1` digits (and twice as many in
the product), which a tiny model cannot compute in its head but can with the Python tool.

A solution calls the tool inside its thinking and boxes what it printed, as chat messages with the tool's turn:
`<think>` + a ```python block that prints the product, the tool's output, then `</think>` and the boxed answer.
`answer_only_fraction` plays the part it plays in the math task: that share of the solutions (a hash of the prompt
picks which) state the answer at once, with an empty `<think>` and no call, so a model trained on them learns two
habits, calling (mostly right) and blurting (wrong: it cannot multiply in its head), and RL can make it call. The
record also carries the one-turn answer-only `completion`, which trains a model without the tool. A problem is in
the test split exactly when the math task's hash of its prompt says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from thinkforge.data.synthetic import distinct_problems, hashed_share


@dataclass(frozen=True)
class ToolProblem:
    prompt: str
    left: int
    right: int
    level: int
    answer_only_fraction: float = 0.0

    @property
    def answer(self) -> str:
        return str(self.left * self.right)

    def answer_only(self) -> str:
        return "<think>\n</think>\n\\boxed{" + self.answer + "}"

    def messages(self) -> list[dict[str, str]]:
        """The solution with its tool call (or, for the answer-only share, without one): what SFT on tool-using
        traces trains (the tool's turn carries no loss)."""
        if hashed_share(self.prompt, "answer-only", self.answer_only_fraction):
            return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer_only()}]
        call = f"<think>\n```python\nprint({self.left} * {self.right})\n```\n"
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": call},
            {"role": "tool", "content": f"{self.answer}\n"},
            {"role": "assistant", "content": "</think>\n\\boxed{" + self.answer + "}"},
        ]

    def as_record(self) -> dict[str, object]:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "completion": self.answer_only(),
            "messages": self.messages(),
            "level": self.level,
        }


def make_problem(rng: random.Random, level: int, answer_only_fraction: float = 0.0) -> ToolProblem:
    """Operands of `level + 1` digits whose product has twice as many: every answer of a level is as long (the
    tiny model copied six-digit results right, and dropped a digit of five-digit ones)."""
    low, high = math.isqrt(10 ** (2 * level + 1) - 1) + 1, 10 ** (level + 1) - 1
    left = rng.randint(low, high)
    right = rng.randint(-(-(10 ** (2 * level + 1)) // left), high)
    return ToolProblem(f"What is {left} * {right}?", left, right, level, answer_only_fraction)


def generate(
    split: str,
    count: int,
    *,
    min_level: int = 2,
    max_level: int = 2,
    answer_only_fraction: float = 0.0,
    seed: int = 0,
) -> list[ToolProblem]:
    """`count` distinct products of `split`, levels (digits - 1) cycling from min_level to max_level."""
    rng = random.Random(f"thinkforge-synthetic-tool-{seed}-{split}")
    return distinct_problems(
        split, count, min_level, max_level, lambda level: make_problem(rng, level, answer_only_fraction)
    )
