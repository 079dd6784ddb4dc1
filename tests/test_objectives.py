"""The objectives beside GRPO's clipped surrogate, by hand: GSPO's sequence ratio, CISPO, INTELLECT-2's delta, the
k1/k2/k3 KL estimators and high-entropy-token training. Each also reduces, at μ = 1 with the ratio exactly 1, to
the plain policy gradient, and keeps the sum form's exact normalisation over micro-batches."""

from __future__ import annotations

import math

import pytest
import torch
from test_losses_grpo import setup_case

from thinkforge.errors import ConfigError
from thinkforge.losses import (
    entropy_threshold,
    high_entropy_mask,
    importance_ratio,
    kl_penalty,
    policy_loss_sum,
)
from thinkforge.objectives import PolicyObjective
from thinkforge.stage_configs import GRPOConfig


def objective_loss(logps, old, advantages, mask, *, entropy_mask=None, ref_logps=None, **knobs):
    """The batch mean of `policy_loss_sum` under `PolicyObjective(**knobs)` and its token-mean metrics."""
    summed = policy_loss_sum(
        logps, old, advantages, mask, PolicyObjective(**knobs), ref_logps=ref_logps, max_completion_length=4,
        entropy_mask=entropy_mask,
    )  # fmt: skip
    return summed.mean(), {name: value / summed.units for name, value in summed.metrics.items()}


def test_gspo_ratio_is_the_geometric_mean_of_the_sequence_and_is_clipped_once():
    logps, old, mask = setup_case()
    ratio = importance_ratio(logps, old, mask.float(), per_sequence=True)
    s0, s1 = 2 ** (1 / 3), 0.5 ** (1 / 2)  # the padding token's ratio does not count
    torch.testing.assert_close(ratio, torch.tensor([[s0] * 3, [s1] * 3]))
    clip = {"epsilon_low": 0.2, "epsilon_high": 0.2, "surrogate": "gspo"}
    advantages = torch.tensor([1.0, 1.0])
    # seq0: min(1.26, clip 1.2) = 1.2; seq1: min(0.707, 0.8) = 0.707
    grpo, metrics = objective_loss(logps, old, advantages, mask, aggregation="sequence_mean", **clip)
    assert grpo.item() == pytest.approx((-1.2 - s1) / 2)
    dapo, _ = objective_loss(logps, old, advantages, mask, aggregation="token_mean", **clip)
    assert dapo.item() == pytest.approx((3 * -1.2 + 2 * -s1) / 5)
    assert metrics["clip_fraction/high"].item() == pytest.approx(3 / 5)  # the whole first sequence


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    logps, old, mask = setup_case()
    logps = logps.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    loss, _ = objective_loss(logps, old, advantages, mask, surrogate="cispo", epsilon_low=0.2, epsilon_high=0.28)
    weights = torch.tensor([[1.0, 1.28, 1.0], [1.0, 0.8, 1.0]])  # clip([1, 2, 1]), clip([1, 0.5, 1])
    per_token = -weights * advantages[:, None] * logps.detach() * mask
    assert loss.item() == pytest.approx(per_token.sum().item() / 5)
    loss.backward()
    # d/dlogπ = −sg(w)·A / tokens, the clipped tokens included (PPO's clip would zero them)
    torch.testing.assert_close(logps.grad, -weights * advantages[:, None] * mask / 5)


def test_delta_caps_the_ratio_of_negative_advantages_only():
    logps, old, mask = setup_case()
    options = {"aggregation": "token_mean", "epsilon_low": 0.2, "epsilon_high": 0.28}
    negative = torch.tensor([-1.0, -1.0])
    plain, _ = objective_loss(logps, old, negative, mask, **options)
    two_sided, _ = objective_loss(logps, old, negative, mask, delta=1.5, **options)
    # seq0 token 1 (ratio 2, A = −1): −min(−2, −1.28) = 2 without delta, −min(−1.5, −1.28) = 1.5 with it
    assert plain.item() - two_sided.item() == pytest.approx((2 - 1.5) / 5)
    positive = torch.tensor([1.0, 1.0])
    assert objective_loss(logps, old, positive, mask, delta=1.5, **options)[0].item() == pytest.approx(
        objective_loss(logps, old, positive, mask, **options)[0].item()
    )
    logps = logps.clone().requires_grad_(True)
    objective_loss(logps, old, negative, mask, delta=1.5, **options)[0].backward()
    assert logps.grad[0, 1].item() == 0.0, "past delta the token passes no gradient"


def test_kl_estimators_by_hand():
    logps = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    log_r = math.log(0.25 / 0.5)  # log π_ref/π of token 0; token 1 has π = π_ref
    assert kl_penalty(logps, ref, "k1").tolist() == pytest.approx([-log_r, 0.0])
    assert kl_penalty(logps, ref, "k2").tolist() == pytest.approx([0.5 * log_r**2, 0.0])
    assert kl_penalty(logps, ref, "k3").tolist() == pytest.approx([math.exp(log_r) - log_r - 1, 0.0])
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logps, ref, "k4")
    mask = torch.ones(1, 2)
    loss, metrics = objective_loss(
        logps[None], logps[None].detach(), torch.zeros(1), mask, beta=0.5, kl_estimator="k2", ref_logps=ref[None]
    )
    assert metrics["kl"].item() == pytest.approx(0.5 * log_r**2 / 2)
    assert loss.item() == pytest.approx(0.5 * 0.5 * log_r**2 / 2)


def test_high_entropy_tokens_are_the_top_quantile_of_the_completion_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # 5.0 is padding: not a completion token
    completion_entropies = entropy[mask.bool()]  # [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    threshold = entropy_threshold(completion_entropies, 0.5)
    assert threshold.item() == pytest.approx(0.5)  # the top half: 0.5, 0.7, 0.9
    chosen = high_entropy_mask(entropy, mask, threshold)
    assert chosen.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert entropy_threshold(completion_entropies, 1.0).item() == pytest.approx(0.1), "1.0 keeps every token"


def test_the_entropy_mask_drops_surrogates_but_not_the_normalisation_or_the_kl():
    logps, old, mask = setup_case()
    advantages = torch.tensor([1.0, 1.0])
    kept = torch.tensor([[1, 0, 0], [0, 1, 0]]).bool()
    options = {"aggregation": "token_mean", "epsilon_low": 0.2, "epsilon_high": 0.2}
    loss, metrics = objective_loss(logps, old, advantages, mask, entropy_mask=kept, **options)
    # the kept tokens' surrogates: seq0 token 0 (ratio 1) → −1, seq1 token 1 (ratio 0.5) → −0.5; over 5 tokens
    assert loss.item() == pytest.approx((-1 - 0.5) / 5)
    assert metrics["entropy_mask/fraction"].item() == pytest.approx(2 / 5)
    ref = logps - 0.1
    with_kl, _ = objective_loss(logps, old, advantages, mask, entropy_mask=kept, beta=1.0, ref_logps=ref, **options)
    assert with_kl.item() - loss.item() == pytest.approx((math.exp(-0.1) + 0.1 - 1), rel=1e-4)


OBJECTIVES = {
    "gspo_sequence_mean": {"surrogate": "gspo", "aggregation": "sequence_mean"},
    "gspo_token_mean": {"surrogate": "gspo", "aggregation": "token_mean"},
    "cispo": {"surrogate": "cispo"},
    "delta": {"delta": 1.5},
    "top_entropy": {"entropy_mask": torch.tensor([[1, 0, 1], [0, 1, 1]]).bool()},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_at_ratio_one_each_objective_is_the_plain_policy_gradient(name):
    """μ = 1: old log-probs are the live ones detached, ρ = 1, and the gradient is that of −A·log π aggregated as
    the loss type aggregates (over the kept tokens alone with an entropy mask)."""
    options = OBJECTIVES[name]
    logps, _, mask = setup_case()
    logps = (logps + torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.2, -0.1]])).requires_grad_(True)
    advantages = torch.tensor([0.7, -1.3])
    loss, _ = objective_loss(logps, logps.detach(), advantages, mask, **options)
    (gradient,) = torch.autograd.grad(loss, logps)
    kept = mask * options.get("entropy_mask", torch.ones_like(mask))
    plain = -advantages[:, None] * logps * kept
    if options.get("aggregation") == "sequence_mean":
        expected_loss = (plain.sum(-1) / mask.sum(-1)).mean()
    else:
        expected_loss = plain.sum() / mask.sum()
    (expected,) = torch.autograd.grad(expected_loss, logps)
    torch.testing.assert_close(gradient, expected)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_summed_over_micro_batches_is_the_whole_batch_mean(name):
    options = dict(OBJECTIVES[name])
    logps, old, mask = setup_case()
    advantages = torch.tensor([1.0, -1.0])
    entropy_mask = options.pop("entropy_mask", torch.ones_like(mask).bool())
    objective = PolicyObjective(**options)
    whole, _ = objective_loss(logps, old, advantages, mask, entropy_mask=entropy_mask, **options)
    parts = [
        policy_loss_sum(
            logps[i : i + 1],
            old[i : i + 1],
            advantages[i : i + 1],
            mask[i : i + 1],
            objective,
            entropy_mask=entropy_mask[i : i + 1],
            max_completion_length=4,
        )
        for i in range(2)
    ]
    total, units = sum(part.total for part in parts), sum(part.units for part in parts)
    assert (total / units).item() == pytest.approx(whole.item())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"surrogate": "sentence"}, "stage.surrogate"),
        ({"aggregation": "dapo"}, "stage.aggregation"),
        ({"kl_estimator": "k4"}, "stage.kl_estimator"),
        ({"top_entropy_quantile": 0.0}, "stage.top_entropy_quantile"),
        ({"top_entropy_quantile": 1.5}, "stage.top_entropy_quantile"),
        ({"delta": 1.2}, "stage.delta"),
        ({"delta": 4.0, "surrogate": "cispo"}, "stage.delta"),
    ],
)
def test_out_of_range_objective_settings_fail_early(settings, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**settings)
