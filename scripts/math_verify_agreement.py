"""How often thinkforge's grader agrees with the labels of math-verify's own public test suite.

    git clone https://github.com/huggingface/Math-Verify && python scripts/math_verify_agreement.py Math-Verify/tests

Every `(gold, pred, expected)` case of those tests' `pytest.mark.parametrize` lists is read from the source (no
code of theirs runs), skipping cases that set non-default options (strict=False, set-relation comparison). Each
side goes through lenient extraction (`extract_answer(text, lenient=True)`) and then `answers_match_many`, the same
path as `thinkforge-eval grading=lenient`. Prints the agreement per file, next to math-verify's own (its `parse`
and `verify` with their defaults, on the same cases), and lists thinkforge's disagreements.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from math_verify import parse, verify

from thinkforge.rewards.math import answers_match_many, extract_answer

LABELS = ("expected", "result")
DEFAULT_OPTIONS = {"strict": True, "allow_set_relation_comp": False}


def labelled_cases(test_file: Path) -> list[tuple[str, str, int]]:
    cases = []
    for node in ast.walk(ast.parse(test_file.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize" and len(node.args) == 2):
            continue
        names = [name.strip() for name in ast.literal_eval(node.args[0]).split(",")]
        if "gold" not in names or "pred" not in names or not any(label in names for label in LABELS):
            continue
        label = next(label for label in LABELS if label in names)
        for row in node.args[1].elts:
            try:
                values = dict(zip(names, ast.literal_eval(row)))
            except ValueError:
                continue
            if all(values.get(option, default) == default for option, default in DEFAULT_OPTIONS.items()):
                cases.append((values["gold"], values["pred"], int(values[label])))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests_dir", type=Path, help="the tests/ folder of a Math-Verify checkout")
    parser.add_argument("--show", type=int, default=200, help="disagreements to list")
    args = parser.parse_args()
    per_file = {path.name: labelled_cases(path) for path in sorted(args.tests_dir.glob("test_*.py"))}
    cases = [case for file_cases in per_file.values() for case in file_cases]
    golds = [extract_answer(gold, lenient=True) or gold for gold, _, _ in cases]
    preds = [extract_answer(pred, lenient=True) or "" for _, pred, _ in cases]
    verdicts = answers_match_many(list(zip(preds, golds)))
    agree = [int(verdict) == expected for verdict, (_, _, expected) in zip(verdicts, cases)]
    agree_theirs = [int(verify(parse(gold), parse(pred))) == expected for gold, pred, expected in cases]
    print(f"{'file':28s} {'thinkforge':>10s} {'math-verify':>11s} {'cases':>6s}")
    start = 0
    for name, file_cases in per_file.items():
        if file_cases:
            end = start + len(file_cases)
            print(f"{name:28s} {sum(agree[start:end]):10d} {sum(agree_theirs[start:end]):11d} {len(file_cases):6d}")
        start += len(file_cases)
    print(f"{'all':28s} {sum(agree) / len(cases):10.1%} {sum(agree_theirs) / len(cases):11.1%} {len(cases):6d}")
    shown = 0
    for ok, (_, pred, expected), gold_answer, pred_answer in zip(agree, cases, golds, preds):
        if not ok and shown < args.show:
            shown += 1
            print(
                f"- expected {expected}: gold {gold_answer!r:.70} | pred {pred_answer!r:.70}   "
                f"(pred text {pred[-60:]!r})"
            )


if __name__ == "__main__":
    main()
