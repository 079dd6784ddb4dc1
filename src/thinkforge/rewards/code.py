"""Code rewards: the completion's last fenced Python block, run against the row's tests in a sandboxed process.

Each check runs in its own Python process (`python -I -S`: no user site, no environment variables, no current
directory on the path) in a fresh temporary directory, with a wall-clock limit (the whole process group is killed
past it) and `resource` limits on memory, CPU time, processes, file size and open files; on Linux with user
namespaces, `unshare --user --net` gives it no network at all. Inside, before the solution runs, an audit hook
(PEP 578, which code cannot remove) refuses writes outside the working directory, new processes, sockets and
ctypes. The harness, not the solution, decides what passed: a test passes only if it ran to its end without an
exception, and the report carries a per-check nonce, so `sys.exit(0)`, `os._exit(0)` or a printed fake report
score nothing. This is defence in depth for model-written code, not a boundary against a determined attacker:
run untrusted code from outside the training job behind a container or nsjail.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from thinkforge.rewards.math import final_section

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

# Runs in the sandboxed interpreter: argv[1] the limits as JSON; stdin the nonce, the solution and the tests.
_HARNESS = r"""
import ast, io, json, os, resource, sys
def main():
    limits = json.loads(sys.argv[1])
    for name, value in (("RLIMIT_AS", limits["memory"]), ("RLIMIT_CPU", limits["cpu"]), ("RLIMIT_NPROC", 0),
                        ("RLIMIT_FSIZE", limits["file_size"]), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass
    job = json.loads(sys.stdin.read())
    nonce, kind, solution, tests = job.pop("nonce"), job["kind"], job["solution"], job["tests"]
    report, stdout, stdin = os.fdopen(os.dup(1), "w"), sys.stdout, sys.stdin
    home = os.path.realpath(os.getcwd()) + os.sep
    realpath, writes = os.path.realpath, os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.spawn",
              "socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen", "os.kill", "os.killpg",
              "sys._getframe", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
              "object.__getattr__", "sys.settrace", "sys.setprofile"}
    paths = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink", "os.link",
             "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    def outside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and not realpath(os.fsdecode(path)).startswith(home)
    def guard(event, args):
        if event in denied:
            raise PermissionError(f"{event} is not allowed")
        writing = event == "open" and ((args[1] and any(c in str(args[1]) for c in "wax+")) or
                                       (args[1] is None and args[2] & writes))
        if (writing or event in paths) and outside(args[0]):
            raise PermissionError(f"{event} outside the working directory: {args[0]!r}")
    def strict_equal(left, right, _type=type, _isinstance=isinstance, _bool=bool):
        numbers = (int, float, complex)
        if _type(left) is not _type(right) and not (_isinstance(left, numbers) and _isinstance(right, numbers)):
            return False
        return _bool(left == right) and _bool(right == left)
    def checked(test):
        # assert a == b compares with strict_equal: an object whose __eq__ always holds passes nothing
        tree = ast.parse(test)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 \
                    and isinstance(node.test.ops[0], ast.Eq):
                node.test = ast.Call(ast.Name("__strict_equal__", ast.Load()),
                                     [node.test.left, node.test.comparators[0]], [])
        return compile(ast.fix_missing_locations(tree), "<test>", "exec")
    compiled_tests = [checked(test) for test in tests] if kind == "assert" else []
    def run(code, namespace, stdin_text):
        sys.stdin, sys.stdout = io.StringIO(stdin_text), io.StringIO()
        try:
            exec(code, namespace)
            return True, sys.stdout.getvalue()
        except BaseException:
            return False, None
        finally:
            sys.stdin, sys.stdout = stdin, stdout
    program = compile(solution, "<solution>", "exec")
    sys.addaudithook(guard)
    passed = []
    if kind == "assert":
        namespace = {"__name__": "__main__"}
        ok, _ = run(program, namespace, "")
        for test in compiled_tests:
            namespace["__strict_equal__"] = strict_equal
            passed.append(ok and run(test, namespace, "")[0])
    else:
        for case in tests:
            ok, out = run(program, {"__name__": "__main__"}, case["input"])
            passed.append(ok and out.split() == case["output"].split())
    report.write("\n" + nonce + json.dumps(passed) + "\n")
    report.flush()
    os._exit(0)
main()
"""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 1 << 20


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


@functools.cache
def _network_isolation() -> list[str]:
    """`unshare --user --net` where it works (a new network namespace has no interfaces but loopback, down)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "--user", "--net", "true"], capture_output=True, check=False)
    return [unshare, "--user", "--net"] if probe.returncode == 0 else []


def run_tests(
    solution: str, tests: Sequence[str] | Sequence[dict[str, Any]], limits: SandboxLimits = SandboxLimits()
) -> list[bool]:
    """Which of `tests` the solution passes: assert statements (run after the solution, in its namespace), or
    {input, output} pairs (the solution as a program, stdin to stdout, compared token by token). All False when
    the process is killed, crashes, or its report is missing or forged."""
    kind = "io" if tests and isinstance(tests[0], dict) else "assert"
    nonce = secrets.token_hex(16)
    job = json.dumps({"kind": kind, "solution": solution, "tests": list(tests), "nonce": nonce})
    settings = json.dumps({"memory": limits.memory_bytes, "cpu": limits.cpu_s, "file_size": limits.file_size_bytes})
    failed = [False] * len(tests)
    with tempfile.TemporaryDirectory(prefix="thinkforge-code-") as workdir:
        command = [*_network_isolation(), sys.executable, "-I", "-S", "-c", _HARNESS, settings]
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(job.encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            output = b""
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reports = [line[len(nonce) :] for line in output.decode(errors="replace").splitlines() if line.startswith(nonce)]
    if len(reports) != 1:
        return failed
    try:
        passed = json.loads(reports[0])
    except json.JSONDecodeError:
        return failed
    return [bool(p) for p in passed] if len(passed) == len(tests) else failed


def code_scores_many(
    completions: Sequence[str],
    tests: Sequence[CodeTests],
    *,
    lenient: bool = False,
    limits: SandboxLimits = SandboxLimits(),
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
