"""Math answer extraction and equivalence: ungameable, and bounded in time from any thread or process.

`extract_answer` grades only what follows the last `</think>` (no `</think>` -> None, so an answer hidden in the
thinking or an unclosed `<think>` scores 0) and joins *all* `\\boxed{}` of that final section into one set answer,
so hedging with several candidates never equals a single gold answer.

`answers_match_many` compares exact values first (rationals and exact symbolic numbers: `1/2^{99}` is never `1/2^{98}`)
and hands everything else (tuples, intervals, sets, matrices, equations, units) to math-verify on sympy. Every
check runs in a worker process that is killed past its deadline: sympy can hang on inputs such as power towers,
and math-verify's own `signal.alarm` timeouts only work in a main thread. A timeout counts as no match.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
DEFAULT_TIMEOUT_S = 5.0
# starting a worker imports sympy and math-verify: seconds, more on a busy node
STARTUP_TIMEOUT_S = 120.0
_LATE = object()
log = logging.getLogger(__name__)
MATH_WORDS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "arcsin", "arccos", "arctan", "sqrt", "inf"}


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` with balanced braces, in order."""
    contents = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                contents.append(text[start:position].strip())
                break
    return contents


def final_section(completion: str, lenient: bool = False) -> str | None:
    """What follows the last `</think>`, where the answer is graded; None without one, or, `lenient`, the whole
    text when no `<think>` was opened either (an unclosed `<think>` never has an answer)."""
    if THINK_END in completion:
        return completion.rsplit(THINK_END, 1)[1]
    if lenient and THINK_START not in completion:
        return completion
    return None


def extract_answer(completion: str, lenient: bool = False, *, guess: bool = True) -> str | None:
    """The final answer: the `\\boxed{}` after the last `</think>`; several boxes there form one set answer.

    `lenient` is for instruct models that do not box: no `</think>` is needed unless a `<think>` was opened, and a
    text with no box falls back to its stated final answer ("The answer is: 25", "#### 25", "**Answer:** 25"; all
    of them together, like boxes, so restating a different answer is a hedge). `guess` (evaluation only, never a
    reward: hedging could win it) falls back further, to the last formula or the last number."""
    final = final_section(completion, lenient)
    if final is None:
        return None
    boxes = boxed_contents(final)
    if boxes:
        return boxes[0] if len(boxes) == 1 else "\\{" + ", ".join(boxes) + "\\}"
    if not lenient:
        return None
    final = _TURN_MARKER.split(final)[0]
    stated = _stated_answer(final)
    if stated is not None or not guess:
        return stated
    return _guessed_answer(final)


# "The answer is: 25", "the final answer is 25", "Final Answer: 25", "#### 25", "**Answer:** 25", up to the
# sentence's end
_STATED = re.compile(
    r"(?:(?:final answer|the answer)\s*(?:is\s*:?|:)|^[ \t]*#{2,4}"
    r"|\*\*\s*(?:final\s+)?answer\s*:?\s*\*\*\s*:?|^[ \t]*(?:final\s+)?answer\s*:)"
    r"[ \t]*(.+?)[ \t]*(?:\.(?=\s|$)|\n|$)",
    re.I | re.M,
)
# inline math as pandoc reads it: no space inside either dollar, and no digit right after the closing one, so
# "costs $14.80 * 45 hours = $62.40" is two amounts of money, not a formula; with spaces inside the dollars
# ("$ \begin{pmatrix}1 & 0\end{pmatrix} $") only when it holds LaTeX, which money does not
_FORMULA = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\$(?!\s)((?:\\\$|[^$\n])+?)(?<!\s)\$(?!\d)|\\\((.+?)\\\)"
    r"|\$\s+((?:\\\$|[^$\n])*?[\\^_{}](?:\\\$|[^$\n])*?)\s+\$",
    re.S,
)
# a number, not the minutes of a time ("5:00 PM") nor a piece of a word
_NUMBER = re.compile(r"(?<![a-zA-Z\d.,:])(-?\d+(?:[.,]\d+)*)(?![\d:]|[.,]\d)(\s*(?:%|percent\b))?")
_TURN_MARKER = re.compile(r"<\|(?:im_start|im_end|endoftext|eot_id|end)\|>")
_UNIT_WORDS = {"percent", "percentage", "pct", "and", "cm", "meters", "miles", "degrees", "dollars", "units"}
_LATEX = re.compile(r"[\\^{}]")


def _stated_answer(text: str) -> str | None:
    """Every stated final answer of `text`, as one answer: a value stated twice is that value, two different
    values are a set (which a single gold answer never equals)."""
    values = list(dict.fromkeys(value for match in _STATED.finditer(text) if (value := _stated_value(match.group(1)))))
    if not values:
        return None
    return values[0] if len(values) == 1 else "\\{" + ", ".join(values) + "\\}"


def _stated_value(text: str) -> str | None:
    """The value a stated answer names: its formula, or what follows its last "=" or "is" ("8" of "4 * 2 = 8 times
    faster", "34" of "The largest $n$ is 34"); a lone number loses its units; several numbers stay several."""
    text = re.split(r"\s+is\s+", text)[-1]
    formulas: list[str] = [next(group for group in match if group) for match in _FORMULA.findall(text)]
    if formulas:
        return formulas[-1].strip()
    text = text.rsplit("=", 1)[-1].strip()
    if _LATEX.search(text):
        return text or None
    numbers: list[str] = [number + ("%" if percent else "") for number, percent in _NUMBER.findall(text)]
    if len(numbers) == 1:
        return numbers[0]
    if numbers:
        return "\\{" + ", ".join(numbers) + "\\}"
    return text.strip("*: ") or None


def _guessed_answer(text: str) -> str | None:
    """For evaluation only: the last formula, else a short text of numbers and units as it is, else the last
    number that is not part of a time."""
    formulas: list[str] = [next(group for group in match if group) for match in _FORMULA.findall(text)]
    if formulas:
        return formulas[-1].strip()
    words = {word.lower() for word in re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", text)}
    if len(text.strip()) <= 40 and words <= _UNIT_WORDS and "=" not in text:
        return text.strip().rstrip(".") or None
    numbers = _NUMBER.findall(text)
    return numbers[-1][0] if numbers else None


def normalize_answer(answer: str) -> str:
    """A canonical string form: no $, \\boxed, spacing, \\left/\\right, units, currency or variable name; used
    before parsing, and as the voting key of maj@k.

    Written-out forms become the ones math-verify parses: "28 percent" -> `28\\%`, "6 and 8" -> `6,8`,
    `p=-1, p=2` -> `-1,2`, `-2 \\le x \\le 7` -> `x\\in[-2,7]`, an unambiguous decimal comma `2,74` -> `2.74`. A comma
    followed by a space stays a list separator: `32, 349` is two numbers, `32,349` is one."""
    answer = re.sub(r"(?<!\\)\$", "", answer).strip()
    answer = re.sub(r"^\\boxed\{(.*)\}$", r"\1", answer, flags=re.S)
    answer = re.sub(r",\s*\\!\s*", ",", answer)  # "32,\\! 349": LaTeX's thousands spacing
    answer = re.sub(r"(?<=\d)\s*(?:\\?%|percent(?:age)?s?\b|pct\b)", r"\\%", answer)
    answer = re.sub(r"\s*(?:\\q?quad)?\s*(?:\\text\{\s*and\s*\}|\band\b)\s*(?:\\q?quad)?\s*", ",", answer)
    answer = re.sub(
        r"(?<=\d)\s*\\(?:text|textnormal|mathrm|mbox)\{\s*[a-zA-Z][a-zA-Z ]*\}(?:\^[23])?", "", answer
    )  # "5 \text{ cm}"
    answer = re.sub(r"\\(?:text|textbf|textnormal|mathrm|mbox)\{\s*([^}]*)\}", r"\1", answer)
    answer = re.sub(r"^(?:\\\$|[$€£¥])\s*|\s*(?:\\\$|\\euro|[$€£¥]|(?<=\d)\s*[a-zA-Z]{1,2}[²³])$", "", answer)
    answer = re.sub(r"(?<!\\)\\[,;!: ]|\\q?quad|\\left|\\right", "", answer)
    answer = re.sub(r"(?<!,)\s+|(?<=,)\s+(?!\d{3}(?!\d))", "", answer)
    answer = (
        answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    )
    answer = re.sub(r"^\([a-zA-Z](?:,[a-zA-Z])+\)=(?=\()", "", answer)  # "(x,y)=(5,8),(8,5)"
    if re.fullmatch(r"([a-zA-Z])=[^=,a-zA-Z]+(?:,\1=[^=,a-zA-Z]+)*", answer):
        answer = re.sub(r"(^|,)[a-zA-Z]=", r"\1", answer)  # "x=3" -> "3", "p=-1,p=2" -> "-1,2"
    answer = re.sub(r"^(-?\d+),(\d+)$", _decimal_comma, answer)
    answer = re.sub(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])", _without_thousands_commas, answer)
    return _interval_of_chain(answer.rstrip("."))


def _decimal_comma(number: re.Match[str]) -> str:
    """`2,74`, `1000,99`, `0,111` are decimals; `1,2` stays a list of two, and `1,000` a thousand."""
    whole, fraction = number[1], number[2]
    if whole.lstrip("-") == "0" or len(fraction) not in (1, 3):
        return f"{whole}.{fraction}"
    return str(number[0])


def _without_thousands_commas(number: re.Match[str]) -> str:
    """`12,345,678` -> `12345678`; but `(12,102)` alone in brackets is an interval or a point."""
    text = number.string
    before, after = text[number.start() - 1 : number.start()], text[number.end() : number.end() + 1]
    if before and after and before in "([" and after in ")]":
        return str(number[0])
    return str(number[0]).replace(",", "")


_LOWER = r"<=|<|\\leq?|\\lt"
_UPPER = r">=|>|\\geq?|\\gt"
_BOUND = r"(?:(?!\\[lg][et]|[<>=]).)+"


def _interval_of_chain(answer: str) -> str:
    """`a \\le x < b` (or `b > x \\ge a`) as the interval `x\\in[a,b)`, the form math-verify compares with one."""
    for ops, flip in ((_LOWER, False), (_UPPER, True)):
        chain = re.fullmatch(rf"({_BOUND})({ops})([a-zA-Z])({ops})({_BOUND})", answer)
        if chain:
            low, low_op, variable, high_op, high = chain.groups()
            if flip:
                low, low_op, high_op, high = high, high_op, low_op, low
            closed_low, closed_high = ("=" in low_op or "e" in low_op), ("=" in high_op or "e" in high_op)
            return f"{variable}\\in{'[' if closed_low else '('}{low},{high}{']' if closed_high else ')'}"
    return answer


def _check(pred: str, gold: str) -> bool:
    """Runs in a worker: exact comparison when both sides are exact numbers, else math-verify."""
    import sympy
    from math_verify import parse, verify

    _quiet_math_verify()
    left, right = normalize_answer(pred), normalize_answer(gold)
    if left == right:
        return True
    parsed_pred = parse(f"${left}$", parsing_timeout=None)
    parsed_gold = parse(f"${right}$", parsing_timeout=None)
    if not parsed_pred or not parsed_gold:
        return False
    exact_pred, exact_gold = parsed_pred[0], parsed_gold[0]
    if all(isinstance(v, sympy.Expr) and v.is_number and not v.has(sympy.Float) for v in (exact_pred, exact_gold)):
        return bool(sympy.simplify(exact_pred - exact_gold) == 0)
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))


def _quiet_math_verify() -> None:
    """Its per-call 'timeout disabled' notice: the worker pool enforces the deadline instead."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse_gold(gold: str) -> bool:
    import sympy
    from math_verify import parse
    from sympy.matrices import MatrixBase

    _quiet_math_verify()
    stripped = normalize_answer(gold)
    # environment names (\begin{pmatrix}) and commands are markup, not words
    markup_free = re.sub(r"\\(?:begin|end)\{[a-zA-Z*]+\}|\\[a-zA-Z]+", " ", stripped)
    words = re.findall(r"[a-zA-Z]{3,}", markup_free)
    if (
        words
        and all(word.lower() not in MATH_WORDS for word in words)
        and re.fullmatch(r"[a-zA-Z]+(?: [a-zA-Z]+)?", gold_text(gold))
    ):
        return True  # a short text answer ("Evelyn", "east", "ellipse"): the grader matches it exactly
    if any(word.lower() not in MATH_WORDS for word in words):
        return False  # prose such as "see the figure" would otherwise parse as a product of symbols
    return any(isinstance(value, (sympy.Basic, MatrixBase)) for value in parse(f"${stripped}$", parsing_timeout=None))


def gold_text(gold: str) -> str:
    """A gold answer's plain words: `\\text{Evelyn}` -> "Evelyn"."""
    return re.sub(r"\\(?:text|textbf|mathrm|mbox)\{\s*([^}]*)\}", r"\1", gold).strip().strip("$").strip()


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (killed, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _start_worker(owner: int) -> None:
    """Worker initializer. Imports sympy and math-verify up front: seconds of CPU on a busy node, which must not
    count against the first checks' deadlines. And exits once the pool's owner is gone: CPython's pool workers
    outlive an owner killed with SIGKILL (each holds its own queue's pipe ends), and would keep its stdout open,
    and its caller waiting, forever."""
    for module in ("sympy", "math_verify"):
        importlib.import_module(module)

    def watch() -> None:
        while _process_alive(owner):
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-owner").start()


def _ready() -> bool:
    return True


@dataclass
class VerifierPool:
    """Worker processes for answer checks; a worker that overruns its deadline is killed with its pool."""

    workers: int = 2
    timeout_s: float = DEFAULT_TIMEOUT_S
    timeouts: int = 0
    checks: int = 0
    # above this share of checks timing out twice, a warning: slow hardware or a too-small timeout_s, not answers
    warn_rate: float = 0.01
    _executor: ProcessPoolExecutor | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _pool(self) -> ProcessPoolExecutor:
        """The workers, started and warm: deadlines count from here, not from a worker's imports."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_start_worker,
                initargs=(os.getpid(),),
            )
            for future in [self._executor.submit(_ready) for _ in range(self.workers)]:
                future.result(timeout=STARTUP_TIMEOUT_S)
        return self._executor

    def _restart(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            for process in list(getattr(executor, "_processes", {}).values()):
                process.kill()
            executor.shutdown(wait=False, cancel_futures=True)

    def run(self, function: Callable[..., Any], argument_pairs: Sequence[tuple[str, ...]]) -> list[bool | None]:
        """function(*args) for each args, in parallel; None where a check timed out twice or crashed.

        A check past its deadline is retried once, with four times the time, in a fresh pool: on a node whose
        cores are busy with training a slow check is not a wrong one. Only a second timeout scores as no match.
        """
        with self._lock:
            self.checks += len(argument_pairs)
            results = self._run_once(function, argument_pairs, self.timeout_s)
            late = [i for i, result in enumerate(results) if result is _LATE]
            if late:
                again = self._run_once(function, [argument_pairs[i] for i in late], 4 * self.timeout_s)
                for index, result in zip(late, again):
                    results[index] = None if result is _LATE else result
                failed = sum(result is _LATE for result in again)
                self.timeouts += failed
                if failed and self.timeout_rate > self.warn_rate:
                    log.warning(
                        "answer checks: %d of %d ran out of time twice (%.0f s) and score 0; "
                        "%.1f%% of all checks so far",
                        failed,
                        len(results),
                        4 * self.timeout_s,
                        100 * self.timeout_rate,
                    )
            return results

    @property
    def timeout_rate(self) -> float:
        return self.timeouts / max(self.checks + 0.0, 1.0)

    def _run_once(
        self, function: Callable[..., Any], argument_pairs: Sequence[tuple[str, ...]], timeout_s: float
    ) -> list[Any]:
        """Results, with _LATE for a check past its deadline and for those after it (their pool is killed)."""
        futures = [self._pool().submit(function, *args) for args in argument_pairs]
        results: list[Any] = []
        late = False
        for future in futures:
            if late:
                results.append(_LATE)
                continue
            try:
                results.append(bool(future.result(timeout=timeout_s)))
            except FutureTimeout:
                results.append(_LATE)
                late = True
            except BrokenProcessPool as error:
                self._restart()
                raise RuntimeError(
                    "answer-check workers died; a script that scores answers needs an "
                    "`if __name__ == '__main__':` guard"
                ) from error
            except Exception:
                results.append(None)
        if late:
            self._restart()
        return results

    def close(self) -> None:
        with self._lock:
            self._restart()


_shared_pool = VerifierPool()


def shared_verifier_pool() -> VerifierPool:
    """The pool behind `answers_match_many` and `math_accuracy`; its `timeouts` counts checks that ran out of time."""
    return _shared_pool


# Answers that would cost sympy seconds, found by their text: a tower (2^{10^{12}}), a power with a 5-digit
# exponent, a factorial of a 4-digit number, a binomial or Gamma of a power with a 2-digit exponent, a 101-digit
# number, or 1,000 characters of anything; and (below) factorials of big groups and deep nesting.
_COSTLY = re.compile(r"\^\{[^{}]*\^|\^\d+\^|\^\{?\d{5,}|\d{4,}!|\d{101}|\\(?:[dt]?binom|Gamma)\s*\{[^{}]*\^\{?\d{2}")
# what makes a bracketed group's factorial huge: a power, a factorial or a 4-digit number inside it
_BIG_ARGUMENT = re.compile(r"[\^!]|\d{4}")
# brackets nested deeper than this: sympy's parser recurses once per level (honest answers stay under 10)
MAX_NESTING = 24
_OPENING = {")": "(", "}": "{", "]": "["}


def nesting_depth(text: str) -> int:
    depth = deepest = 0
    for character in text:
        if character in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in ")]}":
            depth -= 1
    return deepest


def _big_factorial(text: str) -> bool:
    """A factorial of a bracketed group that holds a power, a factorial or a 4-digit number: (10^{10})!, ((5!)!)!."""
    for end in (match.start() for match in re.finditer(r"[)}\]]\s*!", text)):
        depth = 0
        for start in range(end, -1, -1):
            if text[start] in _OPENING:
                depth += 1
            elif text[start] in "([{":
                depth -= 1
                if depth == 0:
                    if _BIG_ARGUMENT.search(text[start + 1 : end]):
                        return True
                    break
    return False


def too_costly(answer: str) -> bool:
    """Whether an answer's shape alone makes sympy slow: it is then compared as text only, never parsed and never
    retried, so it costs microseconds instead of timeouts."""
    text = normalize_answer(answer)
    if len(text) > 1000 or _COSTLY.search(text) or nesting_depth(text) > MAX_NESTING:
        return True
    return _big_factorial(text)


def answers_match_many(pairs: Sequence[tuple[str, str]], pool: VerifierPool | None = None) -> list[bool]:
    """A costly answer matches only as the gold's very text: it never reaches sympy, so it returns at once."""
    checked = [i for i, (pred, _) in enumerate(pairs) if not too_costly(pred)]
    results = [normalize_answer(pred) == normalize_answer(gold) for pred, gold in pairs]
    for index, result in zip(checked, (pool or _shared_pool).run(_check, [pairs[i] for i in checked])):
        results[index] = bool(result)
    return results


def answers_match(pred: str, gold: str) -> bool:
    """Mathematical equivalence; LaTeX or plain, with or without `$…$`; False on timeout."""
    return answers_match_many([(pred, gold)])[0]


def gold_is_parseable(gold: str, pool: VerifierPool | None = None) -> bool:
    return golds_parseable_many([gold], pool)[0]


def golds_parseable_many(golds: Sequence[str], pool: VerifierPool | None = None) -> list[bool]:
    return [bool(result) for result in (pool or _shared_pool).run(_parse_gold, [(gold,) for gold in golds])]


def math_accuracy(completion: str, gold: str, lenient: bool = False, *, guess: bool = True) -> float:
    return math_accuracy_many([completion], [gold], lenient=lenient, guess=guess)[0]


def math_accuracy_many(
    completions: Sequence[str],
    golds: Sequence[str],
    pool: VerifierPool | None = None,
    lenient: bool = False,
    *,
    guess: bool = True,
) -> list[float]:
    """1.0/0.0 per completion; all answer checks of the batch run at once in the worker pool."""
    answers = [extract_answer(completion, lenient, guess=guess) for completion in completions]
    checkable = [i for i, answer in enumerate(answers) if answer is not None]
    scores = [0.0] * len(completions)
    for index, match in zip(checkable, answers_match_many([(str(answers[i]), golds[i]) for i in checkable], pool)):
        scores[index] = float(match)
    return scores
