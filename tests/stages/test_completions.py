"""Padding-free RL batches: packed rows, and rows that score a shared prompt once, give the padded path's losses and
gradients for every GRPO and DPO loss type."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_QWEN as MODEL

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.config import ModelConfig
from thinkforge.data.packing import IGNORE_INDEX, collate_documents, completion_documents, document_rows, unpack
from thinkforge.losses import dpo_loss_sum, policy_loss_sum
from thinkforge.objectives import AGGREGATIONS, DPO_LOSS_TYPES, SURROGATES, PolicyObjective
from thinkforge.stages.completions import completion_scores

LAYOUTS = {"padded": (False, False), "packed": (True, False), "shared_prompt": (True, True)}


@pytest.fixture(scope="module")
def model(chat) -> CausalLM:
    # dropout off and fp32: the layouts must agree to rounding, not to a noise level
    hf = load_hf_model(
        ModelConfig(config=dict(MODEL), attn_implementation="sdpa", dtype="float32"),
        chat,
        param_dtype=torch.float32,
    )
    return CausalLM(hf).eval()


def groups_of(rng: random.Random, prompts: int, per_prompt: int, vocab: int) -> list[tuple[list[int], list[list[int]]]]:
    """Prompts of 1-40 tokens with completions of 1-30 tokens: lengths vary as sampled rollouts do."""
    return [
        (
            [rng.randrange(vocab) for _ in range(rng.randint(1, 40))],
            [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(per_prompt)],
        )
        for _ in range(prompts)
    ]


def scored_batch(groups, layout: str, trainable=lambda member: True) -> dict[str, torch.Tensor]:
    pack, share = LAYOUTS[layout]
    per_prompt = len(groups[0][1])
    documents = [
        document
        for g, (prompt, completions) in enumerate(groups)
        for document in completion_documents(
            prompt,
            [(g * per_prompt + k, c, trainable(g * per_prompt + k)) for k, c in enumerate(completions)],
            share_prompt=share,
        )
    ]
    capacity = max(len(d) for d in documents)
    return collate_documents(document_rows(documents, capacity, pack=pack), 0, capacity=capacity, flatten=False)


def gradients(model: CausalLM) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def assert_same(
    first: tuple[torch.Tensor, list[torch.Tensor]], second: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    torch.testing.assert_close(first[0], second[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(first[1], second[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_layouts_hold_the_same_tokens_and_a_completion_sees_only_its_prompt_and_itself():
    groups = [([5, 6, 7], [[1, 2], [3]])]
    shared = scored_batch(groups, "shared_prompt")
    # prompt[:-1], then each branch restarts at the prompt's last token
    assert shared["input_ids"].tolist() == [[5, 6, 7, 1, 2, 7, 3]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    mask = shared["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0]  # the second branch's first token: the prompt and itself
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]
    for layout in LAYOUTS:
        batch = scored_batch(groups, layout)
        assert batch["targets"].tolist() == [[1, 2], [3, IGNORE_INDEX]]
        assert batch["members"].tolist() == [0, 1]


def test_packing_and_prompt_sharing_save_tokens(tokenizer):
    groups = groups_of(random.Random(0), prompts=6, per_prompt=4, vocab=len(tokenizer))
    slots = {layout: scored_batch(groups, layout)["input_ids"].numel() for layout in LAYOUTS}
    assert slots["shared_prompt"] < slots["packed"] < slots["padded"]


@pytest.mark.parametrize(
    "surrogate,aggregation",
    [(s, "token_mean") for s in SURROGATES] + [("clip", a) for a in AGGREGATIONS[:1] + AGGREGATIONS[2:]],
)
def test_grpo_loss_and_gradients_equal_the_padded_path(model, tokenizer, surrogate, aggregation):
    rng = random.Random(1)
    groups = groups_of(rng, prompts=5, per_prompt=4, vocab=len(tokenizer))
    advantages = torch.randn(20, generator=torch.Generator().manual_seed(0))
    truncated = {3, 11}  # masked as mask_truncated does: laid out, never trained

    def run(layout: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = scored_batch(groups, layout, trainable=lambda member: member not in truncated)
        logps, entropy = completion_scores(model, batch, with_entropy=True, temperature=0.7)
        old = logps.detach() + 0.05 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        reference = logps.detach() - 0.1
        mask = batch["targets"] != IGNORE_INDEX
        objective = PolicyObjective(surrogate, aggregation, epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
        result = policy_loss_sum(
            logps,
            old * mask,
            advantages[batch["members"]],
            mask,
            objective,
            ref_logps=reference * mask,
            max_completion_length=30,
        )
        result.total.backward()
        return torch.stack([result.total, result.units.float(), (entropy * mask).sum()]), gradients(model)

    padded = run("padded")
    assert_same(run("packed"), padded)
    assert_same(run("shared_prompt"), padded)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_and_gradients_equal_the_padded_path(model, tokenizer, loss_type):
    groups = groups_of(random.Random(3), prompts=6, per_prompt=2, vocab=len(tokenizer))

    def run(layout: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = scored_batch(groups, layout)
        logps, _ = completion_scores(model, batch)
        sides = logps.sum(-1).view(-1, 2)
        chosen_tokens = (batch["targets"] != IGNORE_INDEX).sum(-1).view(-1, 2)[:, 0]
        result = dpo_loss_sum(
            sides[:, 0],
            sides[:, 1],
            sides[:, 0].detach() - 0.3,
            sides[:, 1].detach() + 0.2,
            beta=0.1,
            loss_type=loss_type,
            label_smoothing=0.1 if loss_type == "sigmoid" else 0.0,
            rpo_alpha=0.5,
            chosen_tokens=chosen_tokens,
        )
        result.total.backward()
        return result.total.detach().reshape(1), gradients(model)

    padded = run("padded")
    assert_same(run("packed"), padded)
    assert_same(run("shared_prompt"), padded)


def test_unpack_reads_each_completion_back_in_member_order():
    documents = completion_documents([9, 8], [(1, [4, 5, 6], True)], share_prompt=False) + completion_documents(
        [7], [(0, [2], True)], share_prompt=False
    )
    batch = collate_documents(document_rows(documents, 5, pack=True), 0, capacity=5, flatten=False)
    values = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).view(batch["input_ids"].shape) + 1
    unpacked = unpack(values, batch["unpack_index"])
    assert batch["members"].tolist() == [0, 1]
    assert batch["targets"].tolist() == [[2, IGNORE_INDEX, IGNORE_INDEX], [4, 5, 6]]
    assert (unpacked[0, 1:] == 0).all() and (unpacked[1] > 0).all()
