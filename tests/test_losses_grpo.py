"""GRPO family losses by hand: advantages, aggregation types, both clipping sides, the k3 KL."""

from __future__ import annotations

import math

import pytest
import torch

from thinkforge.losses import group_advantages, grpo_loss, loss_units, policy_loss_sum
from thinkforge.objectives import PolicyObjective


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # groups of 3: [1,0,0] and [1,1,1]
    # group 0: mean 1/3, unbiased std sqrt(1/3); group 1: mean 1, std 0
    std0 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(2 / 3) / (std0 + 1e-4), (-1 / 3) / (std0 + 1e-4), (-1 / 3) / (std0 + 1e-4), 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 3, "group").tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-6)
    batch_std = rewards.std().item()
    assert group_advantages(rewards, 3, "batch").tolist() == pytest.approx(
        [a / (batch_std + 1e-4) for a in [2 / 3, -1 / 3, -1 / 3, 0, 0, 0]], abs=1e-6
    )
    with pytest.raises(ValueError):
        group_advantages(rewards, 4)


def test_batch_scaled_advantages_of_a_rank_share_use_the_global_batch_std():
    """Two ranks, one group each: each rank's share alone has another std than the whole batch."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0, 3.0])
    whole = group_advantages(rewards, 4, "batch")
    shares = [group_advantages(share, 4, "batch", batch_std=rewards.std().item()) for share in rewards.chunk(2)]
    torch.testing.assert_close(torch.cat(shares), whole)
    assert not torch.allclose(group_advantages(rewards[:4], 4, "batch"), whole[:4]), "the local std would differ"


def setup_case():
    # two sequences of up to 3 tokens; the second has one padding token
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 1.0, 0.5]]))  # ratios [1, 2, 1], [1, 0.5, 1]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, old, mask


def test_aggregation_types_by_hand():
    logps, old, mask = setup_case()
    advantages = torch.tensor([1.0, 1.0])
    # per token -min(ρA, clip(ρ)A) with ε=0.2: seq0 [-1, -1.2, -1], seq1 [-1, -0.5]
    clip = {"epsilon_low": 0.2, "epsilon_high": 0.2}
    grpo, _ = grpo_loss(logps, old, advantages, mask, loss_type="grpo", max_completion_length=4, **clip)
    assert grpo.item() == pytest.approx(((-3.2 / 3) + (-1.5 / 2)) / 2)
    dapo, _ = grpo_loss(logps, old, advantages, mask, loss_type="dapo", max_completion_length=4, **clip)
    assert dapo.item() == pytest.approx(-4.7 / 5)
    dr, _ = grpo_loss(logps, old, advantages, mask, loss_type="dr_grpo", max_completion_length=4, **clip)
    assert dr.item() == pytest.approx(-4.7 / (2 * 4))


def test_clipping_on_both_sides_with_asymmetric_epsilons():
    logps, old, mask = setup_case()
    # positive advantage: ρ=2 is clipped at 1+ε_high=1.28; negative advantage: ρ=0.5 is clipped at 1-ε_low=0.8
    loss, metrics = grpo_loss(
        logps,
        old,
        torch.tensor([1.0, -1.0]),
        mask,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=4,
    )
    seq0 = [-1.0, -1.28, -1.0]
    seq1 = [1.0, 0.8]  # -min(ρA, clip(ρ)A) = -min(-0.5, -0.8) = 0.8
    assert loss.item() == pytest.approx((sum(seq0) + sum(seq1)) / 5)
    assert metrics["clip_fraction/high"].item() == pytest.approx(1 / 5)
    assert metrics["clip_fraction/low"].item() == pytest.approx(1 / 5)
    # the clipped side passes no gradient
    logps = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(
        logps, old, torch.tensor([1.0, -1.0]), mask, loss_type="dapo", epsilon_high=0.28, max_completion_length=4
    )
    loss.backward()
    assert logps.grad[0, 1].item() == 0.0 and logps.grad[1, 1].item() == 0.0
    assert logps.grad[0, 0].item() != 0.0


def test_k3_kl_by_hand_and_zero_at_reference():
    logps = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    loss, metrics = grpo_loss(
        logps, logps.detach(), torch.zeros(1), mask, beta=0.5, ref_logps=ref, max_completion_length=4
    )
    # token 0: ref−logp = log 0.5 → k3 = 0.5 − log 0.5 − 1; token 1: 0
    k3 = 0.5 - math.log(0.5) - 1
    assert metrics["kl"].item() == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, torch.zeros(1), mask, beta=0.1, max_completion_length=4)


def test_the_sum_form_is_the_mean_times_units_counted_before_the_forward_pass():
    logps, old, mask = setup_case()
    advantages = torch.tensor([1.0, -1.0])
    for loss_type, units in (("grpo", 2), ("dapo", 5), ("dr_grpo", 2 * 4)):
        mean, metrics = grpo_loss(logps, old, advantages, mask, loss_type=loss_type, max_completion_length=4)
        objective = PolicyObjective.of_loss_type(loss_type, epsilon_low=0.2, epsilon_high=0.2)
        summed = policy_loss_sum(logps, old, advantages, mask, objective, max_completion_length=4)
        assert int(summed.units) == units == int(loss_units(mask.bool(), objective.aggregation, 4))
        assert summed.total.item() == pytest.approx(mean.item() * units)
        assert {k: v.item() / units for k, v in summed.metrics.items()} == pytest.approx(
            {k: v.item() for k, v in metrics.items()}
        )


def test_the_named_loss_types_are_the_surrogate_and_aggregation_presets():
    assert PolicyObjective.of_loss_type("grpo").aggregation == "sequence_mean"
    assert PolicyObjective.of_loss_type("dr_grpo").aggregation == "constant"
    assert PolicyObjective.of_loss_type("cispo").surrogate == "cispo"
    logps, old, mask = setup_case()
    # DESIGN.md's signature: max_completion_length is needed by dr_grpo alone
    loss, _ = grpo_loss(logps, old, torch.tensor([1.0, -1.0]), mask)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, torch.tensor([1.0, -1.0]), mask, loss_type="dr_grpo")
