"""Tool calls in the sandbox: what the code printed comes back, capped; every hostile call ends within its limit
with an error the model can read, and the trainer's directory and environment stay as they were."""

from __future__ import annotations

import os
import time

import pytest

from thinkforge.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3)


def test_the_output_and_the_error_line_come_back():
    assert run_python("print(347 * 829)", LIMITS, 100).output == "287663\n"
    failed = run_python("print('before')\n1 / 0", LIMITS, 100)
    assert not failed.ok and failed.output == "before\nZeroDivisionError: division by zero"
    syntax = run_python("print(", LIMITS, 100)
    assert not syntax.ok and syntax.output.startswith("SyntaxError")
    assert run_python("import sys\nsys.exit(0)", LIMITS, 100).ok


# name: (code, what its result says, whether it counts as a clean run)
HOSTILE = {
    "loops forever": ("while True:\n    pass", "timed out", False),
    "forks": ("import os\nos.fork()", "PermissionError: os.fork is not allowed", False),
    "allocates 10 GB": ("x = bytearray(10 * 1024**3)", "MemoryError", False),
    "opens a socket": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", "PermissionError", False),
    "prints 10 MB": ("print('x' * 10_000_000)", "(9999801 more characters cut)", True),
    "prints forever": ("while True:\n    print('x' * 1000)", "timed out", False),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_calls_end_within_their_limit_with_a_readable_result(name):
    code, expected, clean = HOSTILE[name]
    started = time.perf_counter()
    result = run_python(code, LIMITS, 200)
    assert time.perf_counter() - started < LIMITS.wall_s + 2.0
    assert result.ok == clean and expected in result.output and len(result.output) < 400, result.output


@pytest.mark.parametrize(
    ("code", "limits"),
    [
        ("while True:\n    pass", SandboxLimits(wall_s=30.0, cpu_s=1)),
        ("import time\ntime.sleep(30)", SandboxLimits(wall_s=1.0)),
    ],
    ids=["past its CPU time", "past its wall clock"],
)
def test_either_time_limit_reads_as_a_time_out(code, limits):
    """With both limits at the same seconds a busy loop meets either first; both must read alike."""
    result = run_python(code, limits, 200)
    assert result.timed_out and not result.ok and result.seconds < 10.0, result
    assert result.output == f"error: timed out (its limits: {limits.wall_s:g} s of wall clock, {limits.cpu_s} s of CPU)"


def test_a_write_outside_its_directory_fails_and_leaves_the_trainer_untouched(tmp_path):
    before = (os.getcwd(), dict(os.environ))
    target = tmp_path / "escaped.txt"
    code = f"import os\nos.chdir('/')\nos.environ['HACKED'] = '1'\nopen({str(target)!r}, 'w').write('x')"
    result = run_python(code, LIMITS, 200)
    assert not result.ok and "PermissionError" in result.output
    assert not target.exists() and (os.getcwd(), dict(os.environ)) == before
    assert run_python("open('scratch.txt', 'w').write('x')\nprint('ok')", LIMITS, 200).output == "ok\n"
