from __future__ import annotations

import math

import torch

from thinkforge.backbone import token_logprobs
from thinkforge.losses import causal_lm_loss


def test_chunked_logprobs_match_full_softmax_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100
    chunked, entropy = token_logprobs(hidden, weight, targets, chunk_size=5, with_entropy=True)
    full = torch.log_softmax(hidden @ weight.T, -1)
    expected = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(targets == -100, 0)
    torch.testing.assert_close(chunked, expected)
    expected_entropy = -(full.exp() * full).sum(-1).masked_fill(targets == -100, 0)
    torch.testing.assert_close(entropy, expected_entropy.detach())
    grads = torch.autograd.grad(chunked.sum(), (hidden, weight))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_causal_lm_loss_by_hand():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]])
    labels = torch.tensor([[4, 7, -100]])
    loss, count, _ = causal_lm_loss(logprobs, labels)
    assert int(count) == 2
    assert float(loss) == torch.tensor(math.log(2) + math.log(4)).item()
