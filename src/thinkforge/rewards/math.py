"""Math answer extraction and checking.

`extract_answer` grades only what follows the last `</think>` (no `</think>` -> None, so an answer hidden in the
thinking or an unclosed `<think>` scores 0) and joins *all* `\\boxed{}` of that final section into one set answer,
so hedging with several candidates never equals a single gold answer.
"""

from __future__ import annotations

import re
from fractions import Fraction

THINK_END = "</think>"


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


def extract_answer(completion: str) -> str | None:
    """The final answer: the last `\\boxed{}` after the last `</think>`; several boxes there form one set answer."""
    if THINK_END not in completion:
        return None
    boxes = boxed_contents(completion.rsplit(THINK_END, 1)[1])
    if not boxes:
        return None
    return boxes[0] if len(boxes) == 1 else "{" + ", ".join(boxes) + "}"


def _normalise(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", answer)
    answer = re.sub(r"\\[,;! ]|\s+", "", answer)
    return answer.rstrip(".")


def _exact_number(answer: str) -> Fraction | None:
    answer = answer.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer) else answer
    try:
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str, gold: str) -> bool:
    """Equal as normalised strings or as exact rationals (`27.0` = `27`, `1,000` = `1000`)."""
    pred, gold = _normalise(pred), _normalise(gold)
    if pred == gold:
        return True
    pred_number, gold_number = _exact_number(pred), _exact_number(gold)
    return pred_number is not None and pred_number == gold_number


def math_accuracy(completion: str, gold: str) -> float:
    answer = extract_answer(completion)
    return float(answer is not None and answers_match(answer, gold))
