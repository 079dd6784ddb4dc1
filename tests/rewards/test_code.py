"""The code reward's sandbox: right code scores 1, wrong code 0, and every hostile program scores 0 within the
wall-clock limit and leaves this process and the file system untouched."""

from __future__ import annotations

import os
import time

import pytest

from thinkforge.rewards.code import CodeTests, code_scores_many, last_python_block, run_tests
from thinkforge.sandbox import SandboxLimits

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3)


def fenced(code: str) -> str:
    return f"<think>\nwrite it\n</think>\n```python\n{code}\n```"


def test_the_last_python_block_is_the_solution():
    completion = "```python\ndef add(a, b): return 0\n```\nbetter:\n```py\ndef add(a, b): return a + b\n```"
    assert last_python_block(completion) == "def add(a, b): return a + b\n"
    assert last_python_block("no code here") is None


def test_a_correct_solution_passes_every_test_a_wrong_one_none_and_a_partial_one_its_share():
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a - b"),
        fenced("def add(a, b):\n    return a + b if a > 0 else 99"),
        "no code at all",
    ]
    shares = code_scores_many(completions, [CodeTests(tuple(ADD_TESTS))] * 4, limits=LIMITS)
    assert shares == [1.0, 0.0, pytest.approx(2 / 3), None]


def test_stdin_stdout_tests_compare_the_printed_tokens():
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
    right = "a, b = map(int, input().split())\nprint(a + b)"
    assert run_tests(right, tests, LIMITS) == [True, True]
    assert run_tests("print(5)", tests, LIMITS) == [True, False]


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "multiprocessing bomb": "import multiprocessing as m\nwhile True:\n    m.Process(target=print).start()",
    "10 GB allocation": "x = bytearray(10 * 1024**3)",
    "network call": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "always-equal result": "class Same:\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Same()",
    "forged report": "import os\nos.write(1, b'\\n' + b'0' * 32 + b'[true, true, true]\\n')\nos._exit(0)",
    "frame walk to the nonce": "import sys\nf = sys._getframe(1)\nprint(f.f_locals)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_score_0_within_the_limit(name):
    started = time.perf_counter()
    assert run_tests(HOSTILE[name], ADD_TESTS, LIMITS) == [False] * 3
    assert time.perf_counter() - started < LIMITS.wall_s + 2.0


def test_a_write_outside_the_working_directory_scores_0_and_leaves_no_file(tmp_path):
    target = tmp_path / "escaped.txt"
    for program in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})",
    ):
        (tmp_path / "keep.txt").write_text("keep")
        assert run_tests(program + "\ndef add(a, b):\n    return a + b", ADD_TESTS, LIMITS) == [False] * 3, program
        assert not target.exists() and (tmp_path / "keep.txt").exists(), program
    # inside its own temporary directory a solution may write
    inside = "open('scratch.txt', 'w').write('x')\ndef add(a, b):\n    return a + b"
    assert run_tests(inside, ADD_TESTS, LIMITS) == [True] * 3


def test_the_trainer_process_is_untouched():
    before = (os.getcwd(), dict(os.environ))
    run_tests("import os\nos.chdir('/')\nos.environ['HACKED'] = '1'", ADD_TESTS, LIMITS)
    assert (os.getcwd(), dict(os.environ)) == before
