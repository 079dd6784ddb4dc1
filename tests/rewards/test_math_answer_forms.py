"""Answer forms beyond plain numbers: each group holds pairs that mean the same value and pairs that only look alike.

Written from what the notations mean: a percent is a percent however it is spelled, "6 and 8" is the list 6, 8, a
chained inequality is an interval, a decimal comma is a decimal point only where no list or thousands reading
exists, and exact values stay exact inside vectors and intervals too.
"""

from __future__ import annotations

import pytest

from thinkforge.rewards.math import answers_match_many, extract_answer, golds_parseable_many, math_accuracy_many

PERCENT = [
    ("28 %", "28\\%", True),
    ("28 percent", "28\\%", True),
    ("28 pct", "28\\%", True),
    ("28 percentage", "28\\%", True),
    ("28\\%", "28", True),
    ("12.5 percent", "12.5\\%", True),
    ("28 percent", "29\\%", False),
    ("2.8 %", "28\\%", False),
]
RELATIONS = [
    ("x \\geq 5", "x >= 5", True),
    ("x \\lt 3", "x < 3", True),
    ("x \\gt -1", "x > -1", True),
    ("x \\neq 3", "x != 3", True),
    ("x \\le 2", "x \\leq 2", True),
    ("x \\geq 5", "x \\leq 5", False),
    ("x < 3", "x \\leq 3", False),
    ("2x+4y-3=0", "y=-\\frac12 x+\\frac34", True),
    ("2x+4y-3=0", "y=-\\frac12 x+\\frac35", False),
    ("x + y = 1", "2x + 2y = 2", True),
    ("x + y = 1", "x - y = 1", False),
    ("-2 \\le x \\le 7", "x \\in [-2,7]", True),
    ("-2 < x \\le 7", "(-2, 7]", True),
    ("7 \\geq x > -2", "(-2, 7]", True),
    ("-2 \\le x \\le 7", "x \\in (-2,7)", False),
    ("0 < x < 1", "[0, 1]", False),
]
MATRICES = [
    (
        "The identity matrix is $\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}$",
        "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}",
        True,
    ),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix}0.5\\\\0.25\\end{pmatrix}", "\\begin{pmatrix}\\frac12\\\\\\frac14\\end{pmatrix}", True),
    ("\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}", "\\begin{pmatrix}\\frac13\\\\\\frac15\\end{pmatrix}", False),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", False),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\\\0\\end{pmatrix}", False),
    ("[0.5, 2)", "[\\frac12, 2)", True),
    ("(0.6, 2.6667]", "(\\frac35, \\frac83]", False),
]
SEVERAL_ANSWERS = [
    ("6 \\text{ and } 8", "6,8", True),
    ("6 and 8", "8, 6", True),
    ("6 \\text{ and } 8", "6", False),
    ("p=-1, p=\\frac{15}{8}", "p = -1 \\text{ and } p = \\dfrac{15}{8}", True),
    ("p=-1, p=\\frac{15}{8}", "-1, \\frac{15}{8}", True),
    ("p=-1, p=\\frac{15}{7}", "-1, \\frac{15}{8}", False),
    ("(x, y) = (5, 8) \\quad\\text{and}\\quad (8, 5)", "(5, 8), (8, 5)", True),
    ("(x, y) = (5, 8) \\quad\\text{and}\\quad (8, 6)", "(5, 8), (8, 5)", False),
    ("1, 2", "\\{1, 2\\}", True),
    ("1, 2, 3", "\\{1, 2\\}", False),
]
NUMBER_FORMATS = [
    ("1000,99", "1000.99", True),
    ("0,111", "0.111", True),
    ("2,74", "2.74", True),
    ("1,000.99€", "1000.99", True),
    ("2,74 $", "2.74", True),
    ("\\$1,000.99", "1000.99", True),
    ("12{,}000", "12000", True),
    ("32,\\! 349", "32349", True),
    ("32, 349", "32349", False),
    ("1,000", "1", False),
    ("1,2", "1.2", False),
    ("0,111", "111", False),
    ("1,000.99€", "1000.9", False),
]
REORDERED_SUMS = [
    ("\\frac{\\sqrt{3}}{15+2\\sqrt{33}}", "\\frac{\\sqrt{3}}{2\\sqrt{33}+15}", True),
    ("\\sqrt{2}+\\sqrt{5}", "\\sqrt 5 + \\sqrt 2", True),
    ("3 + 2\\sqrt{2}", "2\\sqrt{2} + 3", True),
    ("\\frac{\\sqrt{3}}{15+2\\sqrt{33}}", "\\frac{\\sqrt{3}}{2\\sqrt{33}-15}", False),
    ("3 + 2\\sqrt{2}", "2 + 3\\sqrt{2}", False),
]
FORMS = {
    "percent": PERCENT,
    "relations": RELATIONS,
    "matrices": MATRICES,
    "several answers": SEVERAL_ANSWERS,
    "number formats": NUMBER_FORMATS,
    "reordered sums": REORDERED_SUMS,
}


def test_sixty_new_cases_true_and_false():
    cases = [case for cases in FORMS.values() for case in cases]
    assert len(cases) >= 60
    assert {expected for _, _, expected in cases} == {True, False}


@pytest.mark.parametrize("form", FORMS)
def test_answer_forms(form):
    cases = FORMS[form]
    pairs = [(extract_answer(pred, lenient=True) if "$" in pred else pred, gold) for pred, gold, _ in cases]
    verdicts = answers_match_many(pairs)
    assert [case for case, verdict in zip(cases, verdicts) if verdict != case[2]] == []


LENIENT = [
    ("Final Answer: The largest $n$ is 34.", "34", 1.0),
    ("Final Answer: The final answer is $28 \\%$. I hope it is correct.", "28\\%", 1.0),
    ("So the answer is $\\frac{14}{3}$.<|im_start|>user\nNext: what is $2+2$? $4$", "\\frac{14}{3}", 1.0),
    ("We get $x = 5$ and so the total is $x + 2 = 7$", "7", 1.0),
    ("The number is not 10, it is 1,000.99€", "1000.99", 1.0),
    ("There are 12 apples and 7 pears, so 19 fruits", "19", 1.0),
    ("The answer is \\boxed{7}.", "7", 1.0),
    ("<think>\nwork 42", "42", 0.0),  # an unclosed thought: still no answer
    ("<think>\n$42$\n</think>\nI am not sure.", "42", 0.0),  # the thinking is never graded
    ("AZYUK2A", "2", 0.0),
    ("\\boxed{41} or \\boxed{42}", "42", 0.0),  # hedging stays hedging
]


@pytest.mark.parametrize("completion,gold,expected", LENIENT)
def test_lenient_extraction_for_evaluating_instruct_models(completion, gold, expected):
    assert math_accuracy_many([completion], [gold], lenient=True) == [expected]


def test_strict_grading_the_reward_needs_think_and_a_box():
    unboxed = [completion for completion, _, expected in LENIENT if expected and "\\boxed" not in completion]
    assert math_accuracy_many(unboxed, ["34"] * len(unboxed)) == [0.0] * len(unboxed)
    assert math_accuracy_many(["\\boxed{7}"], ["7"]) == [0.0]


def test_the_gold_check_accepts_every_gold_of_these_forms():
    golds = sorted(
        {gold for cases in FORMS.values() for _, gold, _ in cases}
        | {"6 \\text{ and } 8", "28 percent", "-2 \\le x \\le 7"}
    )
    assert [gold for gold, ok in zip(golds, golds_parseable_many(golds)) if not ok] == []


# How instruct models state answers (SmolLM2's GSM8K replies among them), each read right and each misread
# that the old extraction made: the colon, the time "5:00 PM", money read as an inline formula.
STATED = [
    ("So 3 * 5 = 15 apples.\nThe answer is: 15", "15", 1.0),
    ("Janet sells 9 eggs.\n#### 18", "18", 1.0),
    ("#### 180\nThe answer is: 180", "180", 1.0),
    ("The final answer is 12. I hope it is correct.", "12", 1.0),
    ("**Answer:** 25", "25", 1.0),
    ("**Final Answer:** $\\frac{3}{4}$", "\\frac34", 1.0),
    ("Answer: 7 apples", "7", 1.0),
    ("So, the answer is 3 years.", "3", 1.0),
    ("So, the answer is 4 * 2 = 8 times faster.", "8", 1.0),
    ("The answer is 10,000.", "10000", 1.0),
    ("The answer is 25%.", "25\\%", 1.0),
    ("The answer is: 25", "5", 0.0),
    ("The answer is 4 * 2 = 8 times faster.", "4", 0.0),  # the middle of the equation is not the answer
    ("The answer is 3 or 4.", "3", 0.0),  # hedging in words
    ("The answer is 3 or 4.", "4", 0.0),
    ("The answer is 5.\n\nThe answer is 6.", "6", 0.0),  # restating another answer is a hedge too
    ("#### 5\nThe answer is: 5", "5", 1.0),
]
GUESSED = [
    ("So, Eliza's earnings for this week are $14.80 * 45 hours = $62.40.", "62.40", 1.0),
    ("So, Eliza's earnings for this week are $14.80 * 45 hours = $62.40.", "45", 0.0),
    ("The candle burns from 1:00 PM to 5:00 PM, 4000 centimeters.", "4000", 1.0),
    ("The candle burns from 1:00 PM to 5:00 PM.", "0", 0.0),  # no minutes of a time
    ("The candle burns from 1:00 PM to 5:00 PM.", "5", 0.0),
    ("Mishka spent 3 * $16.50 = $49.50 on clothes.", "49.50", 1.0),
    ("Therefore, Janet makes 624 dollars per day.", "624", 1.0),
    # LaTeX between dollars with spaces inside is a formula (money never holds LaTeX), not its last number
    (
        "The identity matrix is $ \\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix} $.",
        "\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}",
        1.0,
    ),
    ("It costs $ 5 and then $ 7.", "7", 1.0),
]


@pytest.mark.parametrize("completion,gold,expected", STATED + GUESSED)
def test_lenient_reads_stated_answers_and_not_times_or_equations(completion, gold, expected):
    assert math_accuracy_many([completion], [gold], lenient=True) == [expected]


@pytest.mark.parametrize(
    "completion,gold",
    [
        ("I think 3, 4 or 5.", "5"),
        ("It is 3, 4, 5", "4"),
        ("Maybe 41. Or maybe 42", "42"),
        ("Therefore, Janet makes 624 dollars per day.", "624"),  # a reward needs a stated answer, not a guess
        ("<think>\nThe answer is: 42\n</think>\nNo idea.", "42"),
        ("<think>\nThe answer is: 42", "42"),
    ],
)
def test_the_lenient_reward_cannot_be_won_by_a_guess_or_a_hedge(completion, gold):
    assert math_accuracy_many([completion], [gold], lenient=True, guess=False) == [0.0]
    assert math_accuracy_many(["The answer is: 42"], ["42"], lenient=True, guess=False) == [1.0]
