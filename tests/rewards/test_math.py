"""The math verifier: equivalence across answer kinds, every known gaming pattern, and bounded time."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import BENCHMARKS

from thinkforge.rewards.math import (
    VerifierPool,
    answers_match_many,
    extract_answer,
    gold_is_parseable,
    math_accuracy,
    too_costly,
)

EQUIVALENT = [
    ("27", "27"),
    ("27.0", "27"),
    ("27", "27.0"),
    ("-3", "-3"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac{6}{8}", "\\frac{3}{4}"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("12,345,678", "12345678"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\sqrt[3]{8}", "2"),
    ("2\\pi", "2\\pi"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("50\\%", "50"),
    ("12.5\\%", "12.5"),
    ("10\\text{ cm}", "10"),
    ("5 \\text{ dollars}", "5"),
    ("90^\\circ", "90"),
    ("x = 3", "3"),
    ("y=-2", "-2"),
    ("(1, 2)", "(1,2)"),
    ("(3,-1)", "\\left(3, -1\\right)"),
    ("[0, 1)", "[0,1)"),
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("2^{10}", "1024"),
    ("x^2 + 2x + 1", "(x+1)^2"),
    ("\\boxed{7}", "7"),
    ("0.25", "\\frac{1}{4}"),
    ("3.0", "3"),
    ("-\\frac{1}{2}", "-0.5"),
]
DIFFERENT = [
    ("27", "28"),
    ("0.5", "\\frac{1}{3}"),
    ("1/2^{99}", "1/2^{98}"),
    ("3.14", "\\pi"),
    ("6.28", "2\\pi"),
    ("\\sqrt{2}", "1.414"),
    ("(2, 1)", "(1, 2)"),
    ("(0, 1)", "[0, 1]"),
    ("[0, 1)", "[0, 1]"),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}"),
    ("x = 4", "3"),
    ("1000", "100"),
    ("-3", "3"),
    ("\\frac{2}{3}", "0.666"),
    ("1000001", "1000000"),
    ("10^{-12}", "0"),
    ("x^2 + 1", "(x+1)^2"),
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("\\{41, 42\\}", "42"),
    ("41", "\\{41, 42\\}"),
    ("", "3"),
    ("banana", "3"),
    ("12", "1, 2"),
]


def test_at_least_sixty_cases_in_total():
    assert len(EQUIVALENT) + len(DIFFERENT) >= 60


def test_equivalent_answers_match():
    results = answers_match_many(EQUIVALENT)
    assert [pair for pair, ok in zip(EQUIVALENT, results) if not ok] == []


def test_different_answers_do_not_match():
    results = answers_match_many(DIFFERENT)
    assert [pair for pair, ok in zip(DIFFERENT, results) if ok] == []


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("<think>\nwork\n</think>\nSo \\boxed{42}.", "42", 1.0),
        ("<think>\n\\boxed{42}\n</think>\nI am not sure.", "42", 0.0),  # answer only inside <think>
        ("<think>\nwork \\boxed{42}", "42", 0.0),  # unclosed <think>
        ("\\boxed{42}", "42", 0.0),  # no </think> at all
        ("<think>\nw\n</think>\n\\boxed{41}, \\boxed{42}", "42", 0.0),  # hedging, comma
        ("<think>\nw\n</think>\n\\boxed{41} or \\boxed{42}", "42", 0.0),  # hedging, words
        ("<think>a</think>\\boxed{1}<think>b</think>\\boxed{42}", "42", 1.0),  # only after the last </think>
        ("<think>a</think>\\boxed{42}<think>b</think>\\boxed{1}", "42", 0.0),
        ("<think>\nw\n</think>\n\\boxed{(2,2)} and \\boxed{(6,2)}", "\\{(2,2), (6,2)\\}", 1.0),  # genuine set answer
        ("<think>\nw\n</think>\n\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{98}}", 0.0),
        ("<think>\nw\n</think>\nThe answer is \\boxed{\\dfrac{3}{4}}.", "0.75", 1.0),
    ],
)
def test_grading_cannot_be_gamed(completion, gold, expected):
    assert math_accuracy(completion, gold) == expected


def test_only_the_completion_is_graded():
    prompt = "Show that \\boxed{42} is wrong, then solve."
    assert extract_answer(prompt) is None
    assert math_accuracy("<think>\nok\n</think>\n\\boxed{7}", "42") == 0.0


def test_unparseable_gold_is_detected():
    assert gold_is_parseable("\\frac{1}{2}")
    assert not gold_is_parseable("see the figure above")


def test_the_gold_check_accepts_matrices_and_short_text_answers_that_the_grader_grades():
    vector, matrix = (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
    )
    for gold in (vector, matrix, "\\text{Evelyn}", "east", "\\text{ellipse}"):
        assert gold_is_parseable(gold), gold
        assert math_accuracy(f"<think>\n</think>\n\\boxed{{{gold}}}", gold) == 1.0, gold
    assert math_accuracy("<think>\n</think>\n\\boxed{\\begin{pmatrix} 1/3 \\\\ 2/3 \\end{pmatrix}}", vector) == 0.0
    assert math_accuracy("<think>\n</think>\n\\boxed{\\text{west}}", "east") == 0.0


PATHOLOGICAL = [
    "2^{10^{12}}", "9^{9^{9}}", "2^{1234567}", "100000!", "9" * 400, "x+" * 5000,
    "(10^{10})!", "{10^{10}}!", "\\left(10^{10}\\right)!", "((5!)!)!", "(1000+1)!", "\\binom{10^{10}}{10^{5}}",
    "(" * 400 + "1" + ")" * 400, "\\sqrt{" * 400 + "2" + "}" * 400,
]  # fmt: skip


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_pathological_answers_are_cut_off_cheaply_and_score_0(answer):
    math_accuracy("<think></think>\\boxed{1}", "1")  # the pool started and warm
    started = time.perf_counter()
    assert math_accuracy(f"<think>\n</think>\n\\boxed{{{answer}}}", "7") == 0.0
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("answer", ["(n+1)!", "5!", "\\frac{(2n)!}{n!(n+1)!}", "\\binom{10}{3}", "((1+2)\\cdot 3)"])
def test_honest_factorials_and_brackets_are_still_graded(answer):
    assert not too_costly(answer)


def test_honest_answers_still_score_1_while_other_processes_saturate_the_cpus():
    """Busy cores slow the checks down; they must not turn right answers into timeouts (a wrong reward)."""
    import multiprocessing

    spinners = [
        multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    for spinner in spinners:
        spinner.start()
    try:
        pool = VerifierPool(workers=2, timeout_s=1.0)
        golds = [f"\\frac{{{n}}}{{{n + 1}}}" for n in range(1, 25)]
        results = pool.run(_check_for_test, [(f"{n}/{n + 1}", gold) for n, gold in zip(range(1, 25), golds)])
        pool.close()
    finally:
        for spinner in spinners:
            spinner.kill()
    assert results == [True] * 24


def _spin() -> None:
    while True:
        pass


def test_a_check_that_never_returns_is_killed_retried_once_counted_and_warned_of_past_a_trace(caplog):
    """Killed at its deadline, retried once at four times it, then counted; the pool keeps working."""
    pool = VerifierPool(workers=1, timeout_s=0.5, warn_rate=0.3)
    pool.run(_equal, [("1", "1")])  # started and warm
    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="thinkforge.rewards.math"):
        assert pool.run(_hang, [("9^{9^{9^{9^{9^{9}}}}}", "1")]) == [None]
    assert time.perf_counter() - started < 0.5 + 2.0 + 3.0, "two deadlines and a pool restart"
    assert (pool.timeouts, pool.checks, pool.timeout_rate) == (1, 2, 0.5)
    assert "50.0% of all checks so far" in caplog.text
    assert pool.run(_equal, [("2", "2")] * 2) == [True, True]
    assert pool.timeout_rate == 0.25
    pool.close()


def _hang(pred: str, gold: str) -> bool:
    while True:
        pass


def _equal(pred: str, gold: str) -> bool:
    return pred == gold


def test_power_tower_through_the_real_checker_is_bounded():
    started = time.perf_counter()
    assert answers_match_many([("2^{2^{2^{2^{2^{2^{2^{2^{2}}}}}}}}", "3")]) == [False]
    assert time.perf_counter() - started < 5.0 + 1.0


@pytest.mark.skipif(not (BENCHMARKS / "math500.jsonl").exists(), reason="shared benchmarks not present")
def test_math500_solutions_grade_as_their_answers():
    rows = [json.loads(line) for line in (BENCHMARKS / "math500.jsonl").read_text().splitlines() if line.strip()]
    completions = [f"<think>\n</think>\n{row['solution']}" for row in rows]
    pool = VerifierPool(workers=2, timeout_s=10.0)
    from thinkforge.rewards.math import extract_answer as extract

    pairs = [(extract(c) or "", row["answer"]) for c, row in zip(completions, rows)]
    results = pool.run(_check_for_test, pairs)
    agreement = sum(bool(r) for r in results) / len(rows)
    print(f"MATH-500 solution vs answer agreement: {agreement:.3%} ({sum(bool(r) for r in results)}/{len(rows)})")
    pool.close()
    assert sum(bool(r) for r in results) >= 498


from thinkforge.rewards.math import _check as _check_for_test  # noqa: E402


def test_answer_check_workers_exit_with_a_killed_owner(tmp_path):
    """A trainer killed with SIGKILL (a node failure, the kill/resume drills) must not leave its verifier workers
    behind: they would hold its stdout open, so whoever waits for its output waits forever."""
    import subprocess
    import sys

    script = tmp_path / "killed_owner.py"
    script.write_text(
        "import os, signal\n"
        "from thinkforge.rewards.math import math_accuracy_many\n"
        "if __name__ == '__main__':\n"
        "    print(math_accuracy_many(['<think></think>\\\\boxed{1}'], ['1']), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9 and result.stdout.strip() == "[1.0]"


@pytest.mark.skipif(not (BENCHMARKS / "math500.jsonl").exists(), reason="shared benchmarks not present")
def test_every_math500_gold_passes_the_gold_check():
    """Matrices, vectors and text answers included: GRPO and filter-verifiable skip none of them."""
    from thinkforge.rewards.math import golds_parseable_many

    golds = [
        json.loads(line)["answer"] for line in (BENCHMARKS / "math500.jsonl").read_text().splitlines() if line.strip()
    ]
    assert sum(golds_parseable_many(golds)) == len(golds) == 500
