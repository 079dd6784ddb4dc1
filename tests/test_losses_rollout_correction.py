"""Truncated importance sampling between the trainer's policy and another engine's sampler, one mode at a time,
by hand: per-token ratios [2.0, 0.5, 4.0] and, in a second sequence, [1.0, 1.5] with its third token padding."""

from __future__ import annotations

import math

import pytest
import torch

from thinkforge.losses import policy_loss_sum, rollout_correction
from thinkforge.objectives import PolicyObjective

RATIOS = torch.tensor([[2.0, 0.5, 4.0], [1.0, 1.5, 9.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
SAMPLER = torch.tensor([[-1.0, -2.0, -0.5], [-1.2, -0.7, -3.0]])
TRAINER = SAMPLER + RATIOS.log()


@pytest.mark.parametrize(
    "mode, expected, masked",
    [
        ("none", [[1, 1, 1], [1, 1, 0]], 0.0),
        ("token_truncate", [[2.0, 0.5, 3.0], [1.0, 1.5, 0]], 0.0),
        ("token_mask", [[2.0, 0.5, 0.0], [1.0, 1.5, 0]], 1 / 5),
        # sequence ratios: 2 * 0.5 * 4 = 4 (over the cap), 1 * 1.5 = 1.5
        ("sequence_truncate", [[3.0, 3.0, 3.0], [1.5, 1.5, 0]], 0.0),
        ("sequence_mask", [[0.0, 0.0, 0.0], [1.5, 1.5, 0]], 3 / 5),
    ],
)
def test_each_mode_by_hand(mode, expected, masked):
    weights, metrics = rollout_correction(TRAINER, SAMPLER, MASK, mode=mode, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    kept = torch.tensor(expected)[MASK]
    assert metrics["rollout_correction/mean"].item() == pytest.approx(kept.sum().item() / 5, rel=1e-5)
    assert metrics["rollout_correction/min"].item() == pytest.approx(kept.min().item(), rel=1e-5)
    assert metrics["rollout_correction/max"].item() == pytest.approx(kept.max().item(), rel=1e-5)
    assert metrics["rollout_correction/masked_fraction"].item() == pytest.approx(masked)


def test_weights_scale_each_tokens_surrogate_and_not_its_gradient_path():
    logps = TRAINER.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    weights, _ = rollout_correction(TRAINER, SAMPLER, MASK, mode="token_truncate", cap=3.0)
    objective = PolicyObjective(epsilon_high=0.2)
    plain = policy_loss_sum(logps, logps.detach(), advantages, MASK, objective).mean()
    corrected = policy_loss_sum(logps, logps.detach(), advantages, MASK, objective, correction_weights=weights).mean()
    # at ratio 1 the surrogate per token is -A; each is scaled by its weight, then summed over the 5 tokens
    assert plain.item() == pytest.approx(-(3 * 1.0 - 2 * 1.0) / 5)
    assert corrected.item() == pytest.approx(-((2.0 + 0.5 + 3.0) - (1.0 + 1.5)) / 5, rel=1e-5)
    (gradient,) = torch.autograd.grad(corrected, logps)
    torch.testing.assert_close(gradient, -(advantages[:, None] * weights) / 5)


def test_equal_policies_give_weights_of_one():
    weights, metrics = rollout_correction(SAMPLER, SAMPLER, MASK, mode="sequence_mask", cap=2.0)
    assert torch.equal(weights, MASK.float()) and metrics["rollout_correction/masked_fraction"] == 0
    assert math.isclose(metrics["rollout_correction/mean"].item(), 1.0)
