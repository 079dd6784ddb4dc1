"""DESIGN.md's public API: every name imports and keeps its signature (other code and checks call these)."""

from __future__ import annotations

import inspect

import pytest
import torch

from thinkforge import losses
from thinkforge.rewards import math

EMPTY = inspect.Parameter.empty
#: name -> (positional parameters, {keyword-only parameter: default})
SIGNATURES = {
    losses.dpo_loss: (
        ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"],
        {"beta": EMPTY, "loss_type": "sigmoid", "label_smoothing": 0.0},
    ),
    losses.group_advantages: (["rewards", "group_size", "scale"], {}),
    losses.grpo_loss: (
        ["logps", "old_logps", "advantages", "mask"],
        {
            "loss_type": "dapo",
            "epsilon_low": 0.2,
            "epsilon_high": 0.2,
            "beta": 0.0,
            "ref_logps": None,
            "max_completion_length": None,
        },
    ),
    math.extract_answer: (["completion"], {}),
    math.answers_match: (["pred", "gold"], {}),
    math.math_accuracy: (["completion", "gold"], {}),
}


@pytest.mark.parametrize("function", list(SIGNATURES), ids=lambda function: function.__name__)
def test_the_public_signatures_hold(function):
    positional, keywords = SIGNATURES[function]
    parameters = inspect.signature(function).parameters.values()
    leading = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD][: len(positional)]
    assert leading == positional
    keyword_only = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    assert {name: keyword_only.get(name, "missing") for name in keywords} == keywords
    # whatever else a function takes has a default: a call written against DESIGN.md still works
    extra = [p for p in parameters if p.name not in {*positional, *keywords} and p.kind is not p.VAR_KEYWORD]
    assert all(p.default is not EMPTY for p in extra), extra
    assert inspect.signature(losses.group_advantages).parameters["scale"].default == "group"


def test_the_public_functions_answer_as_documented():
    assert math.extract_answer("<think>\nhm\n</think>\nso \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert math.answers_match("\\frac{1}{2}", "0.5") is True
    assert math.answers_match("$1/2^{99}$", "1/2^{98}") is False
    assert math.math_accuracy("<think>\n</think>\n\\boxed{7}", "7") == 1.0
    logps = torch.log(torch.full((2, 3), 0.5))
    loss, metrics = losses.grpo_loss(logps, logps.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    assert loss.item() == pytest.approx(0.0) and "clip_fraction/high" in metrics
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-2.0])
    dpo, _ = losses.dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    assert dpo.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item())
