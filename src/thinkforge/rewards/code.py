"""Code rewards: the completion's last fenced Python block, run against the row's tests in the sandbox
(`thinkforge.sandbox`: its own process, limits, no network, no writes outside its directory). The harness, not the
solution, decides what passed: a test passes only if it ran to its end without an exception.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from thinkforge.rewards.math import final_section
from thinkforge.sandbox import DEFAULT_LIMITS, SandboxLimits, run_sandboxed

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeTests:
    """A coding row's gold: assert statements run after the solution, or {input, output} pairs for a program that
    reads stdin and prints."""

    cases: tuple[Any, ...]

    @classmethod
    def parse(cls, value: Any) -> CodeTests:
        """From a row's `tests` field: a list (or its JSON text, as many datasets store it) of assert statements
        or of {input, output} objects; a TypeError says what is wrong."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise TypeError(
                    "must be a list of assert statements or {input, output} objects (or its JSON)"
                ) from None
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError("must be a non-empty list of assert statements or {input, output} objects")
        if all(isinstance(case, str) and case.strip() for case in value):
            return cls(tuple(value))
        for position, case in enumerate(value):
            if not (
                isinstance(case, Mapping) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)
            ):
                raise TypeError(
                    f"case {position} must be an assert statement, or an {{input, output}} object of strings like "
                    "the others"
                )
        return cls(tuple({"input": case["input"], "output": case["output"]} for case in value))

    def as_json(self) -> list[Any]:
        return list(self.cases)


def last_python_block(completion: str) -> str | None:
    """The last fenced code block of the completion (```python, ```py or a bare fence), or None."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else None


def extract_code(completion: str, lenient: bool = False) -> str | None:
    """The solution: the last fenced block after the last `</think>`, graded like a math answer (code written
    only inside the thinking, or under an unclosed `<think>`, is no solution); `lenient` as `extract_answer`'s."""
    final = final_section(completion, lenient)
    return None if final is None else last_python_block(final)


def run_tests(
    solution: str, tests: Sequence[str] | Sequence[dict[str, Any]], limits: SandboxLimits = DEFAULT_LIMITS
) -> list[bool]:
    """Which of `tests` the solution passes: assert statements (run after the solution, in its namespace), or
    {input, output} pairs (the solution as a program, stdin to stdout, compared token by token). All False when
    the process is killed, crashes, or its report is missing or forged."""
    kind = "io" if tests and isinstance(tests[0], dict) else "assert"
    failed = [False] * len(tests)
    passed, _ = run_sandboxed({"kind": kind, "code": solution, "tests": list(tests)}, limits)
    if not isinstance(passed, list) or len(passed) != len(tests):
        return failed
    return [bool(p) for p in passed]


def code_scores_many(
    completions: Sequence[str],
    tests: Sequence[CodeTests],
    *,
    lenient: bool = False,
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: int | None = None,
) -> list[float | None]:
    """Per completion: the share of its row's tests its solution (`extract_code`) passes, or None when it wrote
    none. The checks run in parallel, as many at once as there are cores."""

    def score(pair: tuple[str, CodeTests]) -> float | None:
        completion, row_tests = pair
        solution = extract_code(completion, lenient)
        if solution is None:
            return None
        passed = run_tests(solution, row_tests.cases, limits)
        return sum(passed) / len(passed)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(score, zip(completions, tests)))
