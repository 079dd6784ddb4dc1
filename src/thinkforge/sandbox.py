"""Model-written Python, run apart from the trainer: the code reward's tests and the tool calls of rollouts.

Each run is its own Python process (`python -I -S`: no user site, no environment variables, no current directory
on the path) in a fresh temporary directory, with a wall-clock limit (the whole process group is killed past it)
and `resource` limits on memory, CPU time, processes, file size and open files; on Linux with user namespaces,
`unshare --user --net` gives it no network at all. Inside, before the model's code runs, an audit hook (PEP 578,
which code cannot remove) refuses writes outside the working directory, new processes, sockets and ctypes. The
harness, not the code, writes the report, which carries a per-run nonce, so `sys.exit(0)`, `os._exit(0)` or a
printed fake report count for nothing. This is defence in depth for model-written code, not a boundary against a
determined attacker: run untrusted code from outside the training job behind a container or nsjail.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

# Runs in the sandboxed interpreter: argv[1] the limits as JSON; stdin the job (its nonce, kind, code and tests).
_HARNESS = r"""
import ast, io, json, os, resource, sys
class Capped(io.StringIO):
    def __init__(self, limit):
        super().__init__()
        self.limit, self.dropped = limit, 0
    def write(self, text):
        room = max(0, self.limit - self.tell())
        super().write(text[:room])
        self.dropped += max(0, len(text) - room)
        return len(text)
def main():
    limits = json.loads(sys.argv[1])
    memory, cpu, file_size = limits["memory"], limits["cpu"], limits["file_size"]
    # CPU: SIGXCPU at the soft limit, which the parent reads as a time-out (at soft == hard Linux sends SIGKILL)
    bounds = {"RLIMIT_AS": (memory, memory), "RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_NPROC": (0, 0),
              "RLIMIT_FSIZE": (file_size, file_size), "RLIMIT_NOFILE": (64, 64), "RLIMIT_CORE": (0, 0)}
    for name, (soft, hard) in bounds.items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError):
            pass
    job = json.loads(sys.stdin.read())
    nonce, kind, solution, tests = job.pop("nonce"), job["kind"], job["code"], job.get("tests", [])
    report, stdout, stderr, stdin = os.fdopen(os.dup(1), "w"), sys.stdout, sys.stderr, sys.stdin
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
    def run(code, namespace, stdin_text, sink):
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin_text), sink, sink
        try:
            exec(code, namespace)
            return None
        except SystemExit as error:
            return None if error.code in (None, 0) else error
        except BaseException as error:
            return error
        finally:
            sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    if kind == "tool":
        sink = Capped(job["max_output_chars"])
        sys.addaudithook(guard)
        try:
            error = run(compile(solution, "<tool>", "exec"), {"__name__": "__main__"}, "", sink)
        except SyntaxError as syntax:
            error = syntax
        line = "" if error is None else f"{type(error).__name__}: {error}"
        result = {"ok": error is None, "output": sink.getvalue(), "dropped": sink.dropped, "error": line}
        report.write("\n" + nonce + json.dumps(result) + "\n")
        report.flush()
        os._exit(0)
    program = compile(solution, "<solution>", "exec")
    sys.addaudithook(guard)
    passed = []
    if kind == "assert":
        namespace = {"__name__": "__main__"}
        ok = run(program, namespace, "", io.StringIO()) is None
        for test in compiled_tests:
            namespace["__strict_equal__"] = strict_equal
            passed.append(ok and run(test, namespace, "", io.StringIO()) is None)
    else:
        for case in tests:
            sink = io.StringIO()
            ok = run(program, {"__name__": "__main__"}, case["input"], sink) is None
            passed.append(ok and sink.getvalue().split() == case["output"].split())
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


DEFAULT_LIMITS = SandboxLimits()


@functools.cache
def _network_isolation() -> list[str]:
    """`unshare --user --net` where it works (a new network namespace has no interfaces but loopback, down)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "--user", "--net", "true"], capture_output=True, check=False)
    return [unshare, "--user", "--net"] if probe.returncode == 0 else []


def run_sandboxed(job: dict[str, Any], limits: SandboxLimits) -> tuple[Any, bool]:
    """Runs a harness job ({kind, code, ...}); its report (None when the process was killed, crashed, or its
    report is missing or forged) and whether it ran out of time: the wall-clock limit, or the CPU limit (SIGXCPU),
    whichever came first; with both at the same number of seconds, a busy loop meets either."""
    nonce = secrets.token_hex(16)
    settings = json.dumps({"memory": limits.memory_bytes, "cpu": limits.cpu_s, "file_size": limits.file_size_bytes})
    timed_out = False
    with tempfile.TemporaryDirectory(prefix="thinkforge-sandbox-") as workdir:
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
            output, _ = process.communicate(json.dumps({**job, "nonce": nonce}).encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            output, timed_out = b"", True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    timed_out = timed_out or process.returncode == -signal.SIGXCPU
    reports = [line[len(nonce) :] for line in output.decode(errors="replace").splitlines() if line.startswith(nonce)]
    if len(reports) != 1:
        return None, timed_out
    try:
        return json.loads(reports[0]), timed_out
    except json.JSONDecodeError:
        return None, timed_out


@dataclass(frozen=True)
class ToolRun:
    """One tool call's result: `output` is what the code printed (its first `max_output_chars` characters, then a
    note of how many were cut), then its error's last line, or why it was stopped."""

    output: str
    #: ran to its end without an exception, within every limit
    ok: bool
    timed_out: bool
    seconds: float


def run_python(code: str, limits: SandboxLimits, max_output_chars: int) -> ToolRun:
    """Runs a tool call's code once, in the sandbox."""
    started = time.perf_counter()
    report, timed_out = run_sandboxed({"kind": "tool", "code": code, "max_output_chars": max_output_chars}, limits)
    seconds = time.perf_counter() - started
    if timed_out:
        limit = f"{limits.wall_s:g} s of wall clock, {limits.cpu_s} s of CPU"
        return ToolRun(f"error: timed out (its limits: {limit})", False, True, seconds)
    if not isinstance(report, dict):
        return ToolRun("error: the process was killed (it passed a memory, CPU or file limit)", False, False, seconds)
    output = str(report.get("output", ""))
    if report.get("dropped"):
        output += f"\n... ({report['dropped']} more characters cut)"
    if report.get("error"):
        output = f"{output.rstrip()}\n{report['error']}".lstrip("\n")
    return ToolRun(output, bool(report.get("ok")), False, seconds)
