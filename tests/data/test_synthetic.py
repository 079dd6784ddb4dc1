from __future__ import annotations

import re

from thinkforge.data import synthetic


def evaluate_trace(completion: str) -> int:
    """Re-does the trace's arithmetic: every line must be right and chain into the next."""
    lines = completion.split("<think>\n")[1].split("\n</think>")[0].split("\n")
    value = None
    for line in lines:
        left, op, right, _, result = line.split()
        assert value is None or int(left) == value, "trace steps must chain"
        expected = {
            "+": int(left) + int(right),
            "-": int(left) - int(right),
            "*": int(left) * int(right),
            "/": int(left) // int(right),
        }[op]
        assert op != "/" or int(left) % int(right) == 0
        assert int(result) == expected
        value = expected
    return value


def test_generation_is_deterministic_and_answers_are_right():
    first = synthetic.generate("train", 200, min_level=1, max_level=5, seed=3)
    assert first == synthetic.generate("train", 200, min_level=1, max_level=5, seed=3)
    for problem in first:
        assert evaluate_trace(problem.completion) == int(problem.answer)
        assert problem.completion.endswith("\\boxed{" + problem.answer + "}.")
        assert int(problem.answer) >= 0
        assert len(re.findall(r"^\d+ [-+*/] \d+ = \d+$", problem.completion, re.M)) == problem.level


def test_train_and_test_never_overlap_whatever_the_seed():
    train = {p.prompt for seed in (0, 1) for p in synthetic.generate("train", 1500, seed=seed)}
    test = {p.prompt for seed in (0, 7) for p in synthetic.generate("test", 300, seed=seed)}
    assert not train & test
    assert all(synthetic.split_of(prompt) == "test" for prompt in test)


def test_levels_cycle_and_problems_are_distinct():
    problems = synthetic.generate("test", 60, min_level=2, max_level=4, seed=0)
    assert [p.level for p in problems[:6]] == [2, 3, 4, 2, 3, 4]
    assert len({p.prompt for p in problems}) == 60


def test_max_number_bounds_the_start_and_every_amount_added():
    problems = synthetic.generate("train", 300, min_level=1, max_level=2, max_number=9, seed=0)
    for problem in problems:
        assert evaluate_trace(problem.completion) == int(problem.answer)
        steps = re.findall(r"^(\d+) ([-+]) (\d+) = \d+$", problem.completion, re.M)
        assert int(steps[0][0]) <= 9
        assert all(int(amount) <= 9 for _, op, amount in steps if op == "+")


def test_answer_only_solutions_skip_the_work_and_leave_the_rest_unchanged():
    worked = synthetic.generate("train", 400, min_level=2, max_level=2, max_number=9, seed=0)
    mixed = synthetic.generate("train", 400, min_level=2, max_level=2, max_number=9, answer_only_fraction=0.7, seed=0)
    assert [p.prompt for p in worked] == [p.prompt for p in mixed] and [p.answer for p in worked] == [
        p.answer for p in mixed
    ]
    terse = [m for m in mixed if m.completion.startswith("<think>\n</think>\n")]
    assert 0.6 < len(terse) / len(mixed) < 0.8
    assert all(m.completion == w.completion for w, m in zip(worked, mixed) if m not in terse)
    assert all(m.completion.endswith("\\boxed{" + m.answer + "}.") for m in terse)


def test_unboxed_answers_are_plain_text_the_grader_does_not_accept():
    from thinkforge.rewards.math import math_accuracy

    mixed = synthetic.generate("test", 400, min_level=2, max_level=2, boxed_fraction=0.3)
    assert 0.2 < sum("boxed" in p.completion for p in mixed) / len(mixed) < 0.4
    plain = synthetic.generate("test", 20, min_level=2, max_level=2, boxed_fraction=0.0)
    assert all(p.completion.endswith(f"The answer is {p.answer}.") and "boxed" not in p.completion for p in plain)
    assert all(evaluate_trace(p.completion) == int(p.answer) for p in plain)
    assert math_accuracy(plain[0].completion, plain[0].answer) == 0.0
