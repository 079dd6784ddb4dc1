"""SFT masking, DPO losses by hand, and both stages end to end (in-process and with FSDP2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, compose_config, logged, run_cli

from thinkforge.chat import ChatFormat
from thinkforge.config import validate
from thinkforge.data import synthetic
from thinkforge.losses import dpo_loss, dpo_loss_sum
from thinkforge.rewards.math import math_accuracy_many
from thinkforge.rollout.base import Rollout
from thinkforge.rollout.pairs import graded, pair_rollouts
from thinkforge.stages.sft import SFT
from thinkforge.training import run_stage


def sft_stage(*overrides, tokenizer):
    run = validate(compose_config("stage=sft", *overrides))
    return SFT(run, ChatFormat(tokenizer, run.data.system_prompt))


def test_assistant_only_mask_token_by_token(tokenizer):
    stage = sft_stage("prompt=phi4_reasoning", tokenizer=tokenizer)
    messages = [
        {"role": "user", "content": "Ava has 3 apples."},
        {"role": "assistant", "content": "<think>\n3\n</think>\n\\boxed{3}"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]
    sequence = stage.assistant_only(messages)
    tokens = tokenizer.convert_ids_to_tokens(list(sequence.input_ids))
    targets = {i + 1 for i, label in enumerate(sequence.labels) if label != -100}
    assert all(sequence.labels[i - 1] == sequence.input_ids[i] for i in targets)
    target_text = ["".join(tokens[i] for i in sorted(targets))]
    decoded = tokenizer.convert_tokens_to_string(tokens)
    assert decoded.count("<|im_start|>") == 5  # system, user, assistant, user, assistant
    # exactly the two replies, each with its end-of-turn token and nothing after it
    expected = ["<think>\n3\n</think>\n\\boxed{3}<|im_end|>", "\\boxed{4}<|im_end|>"]
    runs, current = [], []
    for i in range(len(tokens)):
        if i in targets:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode([sequence.input_ids[i] for i in run]) for run in runs] == expected, target_text
    system_and_users = tokenizer.decode([t for i, t in enumerate(sequence.input_ids) if i not in targets])
    assert "think through the problem" in system_and_users and "Ava has 3 apples." in system_and_users


def test_sft_refuses_to_split_conversations(tokenizer):
    with pytest.raises(Exception, match=r"data.overflow"):
        sft_stage("data.overflow=split", tokenizer=tokenizer)


@pytest.mark.parametrize(
    "loss_type,smoothing,expected",
    [
        # margin = (−1 − −2) − (−3 − −2) = 2, β = 0.5 → β·margin = 1
        ("sigmoid", 0.0, -math.log(1 / (1 + math.exp(-1)))),
        ("sigmoid", 0.1, -0.9 * math.log(1 / (1 + math.exp(-1))) - 0.1 * math.log(1 / (1 + math.exp(1)))),
        ("ipo", 0.0, (2 - 1 / (2 * 0.5)) ** 2),
        ("hinge", 0.0, 0.0),
    ],
)
def test_dpo_loss_by_hand(loss_type, smoothing, expected):
    loss, metrics = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=0.5,
        loss_type=loss_type,
        label_smoothing=smoothing,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.5)
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_dpo_hinge_with_small_margin_by_hand():
    loss, _ = dpo_loss(
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-1.0, -1.0]),
        torch.tensor([-1.2, -1.0]),
        torch.tensor([-1.0, -1.0]),
        beta=1.0,
        loss_type="hinge",
    )
    assert loss.item() == pytest.approx(((1 - 0.2) + 1) / 2)


def test_rpo_adds_the_chosen_per_token_nll_by_hand():
    args = (
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-5.0, -6.0]),
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-5.0, -6.0]),
    )
    plain, _ = dpo_loss(*args, beta=0.1)
    rpo, metrics = dpo_loss(*args, beta=0.1, rpo_alpha=0.5, chosen_tokens=torch.tensor([2, 3]))
    # zero margins: log 2 each; NLL per token: 4/2 = 2 and 6/3 = 2
    assert plain.item() == pytest.approx(math.log(2))
    assert rpo.item() == pytest.approx(math.log(2) + 0.5 * 2.0)
    assert metrics["nll/chosen"].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(*args, beta=0.1, rpo_alpha=0.5)


def test_dpo_loss_sum_is_the_mean_times_the_pairs_and_sums_the_metrics():
    args = (
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-5.0, -7.0]),
        torch.tensor([-4.5, -6.0]),
        torch.tensor([-5.0, -6.5]),
    )
    mean, per_pair = dpo_loss(*args, beta=0.1, rpo_alpha=0.5, chosen_tokens=torch.tensor([2, 3]))
    summed = dpo_loss_sum(*args, beta=0.1, rpo_alpha=0.5, chosen_tokens=torch.tensor([2, 3]))
    assert int(summed.units) == 2 and summed.total.item() == pytest.approx(2 * mean.item())
    assert {k: v.item() for k, v in summed.metrics.items()} == pytest.approx(
        {k: v.sum().item() for k, v in per_pair.items()}
    )


def test_rollout_pairs_take_correct_over_incorrect_and_count_the_rest():
    right, wrong = "<think>\nx\n</think>\n\\boxed{7}", "<think>\nx\n</think>\n\\boxed{8}"
    texts = [[wrong, right, wrong], [right, right], [wrong, "no think \\boxed{7}"]]
    groups = [
        [Rollout(i, text, (1, 2), finished=j != 2) for j, text in enumerate(group)] for i, group in enumerate(texts)
    ]
    golds = ["7", "7", "7"]
    pairs, counts = pair_rollouts(
        groups,
        ["p0", "p1", "p2"],
        golds,
        graded(groups, golds, math_accuracy_many),
        prompt_indices=[4, 6, 8],
        provenance={"source_model": "m"},
    )
    assert counts == {"pairs": 1, "no_incorrect": 1, "no_correct": 1}
    assert pairs[0]["chosen"] == right and pairs[0]["rejected"] == wrong
    assert pairs[0]["chosen_finished"] and pairs[0]["rejected_finished"]
    assert pairs[0]["provenance"] == {
        "source_model": "m",
        "prompt_index": 4,
        "chosen_sample": 1,
        "rejected_sample": 0,
        "num_correct": 1,
        "num_samples": 3,
    }


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Verified pairs from the synthetic task: the right trace vs the same trace with a wrong final answer."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic.wrong_answer_pairs(64, seed=5)))
    return path


def dpo_overrides(pairs_file):
    return [
        *FAST,
        "experiment=demo_dpo",
        "stage.pairs=file",
        f"data.train={pairs_file}",
        "data.val=null",
        "heldout.num_prompts=0",
    ]


def test_dpo_starts_at_log2_and_precomputed_reference_gives_the_same_losses(tmp_path, pairs_file):
    losses = {}
    for precompute in (False, True):
        result = run_stage(
            compose_config(
                *dpo_overrides(pairs_file),
                "trainer.max_steps=3",
                "optim.lr=2e-3",
                f"stage.precompute_ref_logps={precompute}",
                output_dir=tmp_path / str(precompute),
            )
        )
        losses[precompute] = logged(result.output_dir, "train/loss")
        accuracies = logged(result.output_dir, "train/rewards/accuracies")
    assert losses[False][0] == pytest.approx(math.log(2), abs=1e-6)
    for step in losses[False]:
        assert losses[True][step] == pytest.approx(losses[False][step], abs=1e-5)
    assert losses[False][2] < losses[False][0]
    assert accuracies[2] > 0.5


def test_sft_runs_and_teaches_the_answer_format(tmp_path):
    result = run_stage(
        compose_config(
            *FAST,
            "stage=sft",
            "trainer.max_steps=6",
            "heldout.num_prompts=8",
            "heldout.sampling.max_new_tokens=48",
            output_dir=tmp_path,
        )
    )
    assert (result.export_dir / "model.safetensors").exists()
    losses = logged(result.output_dir, "train/loss")
    assert losses[5] < losses[0]
    assert set(result.metrics) >= {"heldout/accuracy", "heldout/eos_rate", "heldout/mean_length"}


@pytest.mark.parametrize("stage", ["sft", "dpo", "dpo_precomputed"])
def test_stage_runs_with_fsdp(tmp_path, stage, pairs_file):
    overrides = {
        "sft": [*FAST, "stage=sft", "heldout.num_prompts=4", "heldout.sampling.max_new_tokens=16"],
        "dpo": dpo_overrides(pairs_file),
        "dpo_precomputed": [*dpo_overrides(pairs_file), "stage.precompute_ref_logps=true"],
    }[stage]
    result = run_cli(
        *overrides, "trainer.max_steps=2", "hardware=cpu_fsdp", "logger=csv", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert logged(tmp_path, "train/loss")
