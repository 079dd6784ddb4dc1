"""The coding side of the synthetic task and the rows that carry tests: generated solutions pass their own tests
in the sandbox (buggy ones fail them), rows with bad tests are named, and the graders read code as they read math."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from thinkforge.config import DataConfig, validate
from thinkforge.data import synthetic, synthetic_code
from thinkforge.data.records import GOLD, DataError, load_records
from thinkforge.errors import ConfigError
from thinkforge.rewards.code import CodeTests, extract_code
from thinkforge.rewards.grading import grade_many, verify_many
from thinkforge.rewards.shaping import RewardModel


def test_solutions_pass_their_tests_and_buggy_ones_fail_them():
    problems = synthetic_code.generate("train", 40, min_level=1, max_level=3, max_number=9, buggy_fraction=0.5)
    scores = verify_many([p.completion for p in problems], [CodeTests(p.tests) for p in problems])
    buggy = [synthetic.hashed_share(p.prompt, "buggy", 0.5) for p in problems]
    assert scores == [0.0 if bug else 1.0 for bug in buggy]
    assert 10 < sum(buggy) < 30
    assert [p.level for p in problems[:6]] == [1, 2, 3, 1, 2, 3]
    assert all(p.completion.count("    n = n ") == p.level - bug for p, bug in zip(problems, buggy))


def test_the_code_task_keeps_the_math_tasks_split_and_is_deterministic():
    train = synthetic_code.generate("train", 300, max_number=9)
    test = synthetic_code.generate("test", 60, max_number=9)
    assert train == synthetic_code.generate("train", 300, max_number=9)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert all(synthetic.split_of(p.prompt) == "test" for p in test)


def test_synthetic_code_rows_load_with_their_tests_as_the_gold():
    data = validate(compose_config("data=code")).data
    rows = load_records("synthetic", "train", data, required=("prompt", GOLD)).rows
    assert all(isinstance(row[GOLD], CodeTests) and len(row[GOLD].cases) == 3 for row in rows)
    with pytest.raises(ConfigError, match=r"data.synthetic.task"):
        validate(compose_config("data.synthetic.task=poetry"))


def test_a_file_mixes_math_rows_and_coding_rows_and_bad_tests_are_named(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]},
        {"prompt": "Read two numbers, print their sum.", "tests": json.dumps([{"input": "1 2\n", "output": "3"}])},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    golds = [row[GOLD] for row in load_records(str(path), "train", DataConfig(train=str(path)), ("prompt", GOLD)).rows]
    assert golds == [
        "4",
        CodeTests(("assert add(1, 2) == 3",)),
        CodeTests(({"input": "1 2\n", "output": "3"},)),
    ]
    for bad, message in (
        ({"prompt": "p", "tests": []}, "row 4: field 'tests' \\(column 'tests'\\): must be a non-empty list"),
        ({"prompt": "p", "tests": [{"input": "1"}]}, "row 4: field 'tests' .*case 0 must be"),
        ({"prompt": "p"}, "row 4: field 'answer' \\(column 'answer'\\) or 'tests' \\(column 'tests'\\): missing"),
    ):
        path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, bad]))
        with pytest.raises(DataError, match=f"{path}: {message}"):
            load_records(str(path), "train", DataConfig(train=str(path)), ("prompt", GOLD))


ADD = CodeTests(("assert add(1, 2) == 3", "assert add(2, 2) == 4"))
RIGHT = "<think>\nadd them\n</think>\n```python\ndef add(a, b):\n    return a + b\n```"


def test_code_is_read_after_the_thinking_like_an_answer():
    assert extract_code(RIGHT) == "def add(a, b):\n    return a + b\n"
    hidden = "<think>\n```python\ndef add(a, b):\n    return a + b\n```\n</think>\nDone."
    unclosed = "<think>\n```python\ndef add(a, b):\n    return a + b\n```"
    bare = "```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(hidden) is None and extract_code(unclosed) is None and extract_code(bare) is None
    assert extract_code(bare, lenient=True) is not None and extract_code(unclosed, lenient=True) is None
    grades = grade_many([RIGHT, hidden, RIGHT, "<think></think>\\boxed{5}"], [ADD, ADD, "7", "5"])
    assert [(grade.score, grade.answered) for grade in grades] == [(1.0, True), (0.0, False), (0.0, False), (1, True)]


def test_the_code_reward_is_the_share_of_tests_passed_or_all_or_nothing():
    partial = RIGHT.replace("return a + b", "return a + b if a < 2 else 0")
    shares = RewardModel({"code": {"weight": 1.0}, "format": {"weight": 0.5}})
    all_or_nothing = RewardModel({"code": {"weight": 1.0, "fraction": False}})
    scored = shares.score([RIGHT, partial, "no code", RIGHT], [ADD, ADD, ADD, "3"], [20] * 4, [False] * 4, 64)
    assert [total for total, _ in scored] == [1.5, 1.0, 0.0, 0.0]
    assert [parts["accuracy"] for _, parts in scored] == [1.0, 0.0, 0.0, 0.0]
    assert [parts["answered"] for _, parts in scored] == [1.0, 1.0, 0.0, 0.0]
    assert [total for total, _ in all_or_nothing.score([RIGHT, partial], [ADD, ADD], [20] * 2, [False] * 2, 64)] == [
        1.0,
        0.0,
    ]
