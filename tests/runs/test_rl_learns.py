"""Learnability: GRPO and DPO, through the real stages, improve what they are rewarded for.

Formula tests cannot show that an RL loop learns; these can, and they fail when the advantage sign is flipped or
the loss is detached (checked by mutation when they were written). Each runs on a 2-layer model in about a
minute or less on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
from statistics import mean

import pytest
from conftest import LEARNABLE_GRPO, compose_config, leading_space, logged, space_share
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkforge.chat import ChatFormat
from thinkforge.data import synthetic_code
from thinkforge.rewards.shaping import REWARD_FUNCTIONS
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams
from thinkforge.training import run_stage

SMALL_MODEL = [
    "model.config.hidden_size=64",
    "model.config.intermediate_size=128",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
]


GRPO_CASES = {
    "grpo": ["stage.aggregation=sequence_mean"],
    "dapo": ["stage.aggregation=token_mean"],
    "dr_grpo": ["stage.aggregation=constant", "stage.advantage_scale=none"],
    "two_iterations": ["stage.aggregation=token_mean", "stage.num_iterations=2"],
    "kl_to_start": ["stage.aggregation=token_mean", "stage.beta=0.04"],
    # the objectives beside the clipped token ratio, with two iterations so that their ratios leave 1
    "gspo": [
        "stage.aggregation=sequence_mean",
        "stage.surrogate=gspo",
        "stage.epsilon_low=3e-4",
        "stage.epsilon_high=4e-4",
        "stage.num_iterations=2",
    ],
    "cispo": ["stage.surrogate=cispo", "stage.epsilon_low=1.0", "stage.epsilon_high=4.0", "stage.num_iterations=2"],
    # rollouts of the weights two steps older, weighed by the truncated trainer/sampler ratio (AReaL's decoupled PPO)
    "two_steps_stale": ["stage.max_staleness=2", "stage.rollout_correction=token_truncate"],
}


def _sampled_reward(output_dir, reward, steps, *overrides) -> list[float]:
    """The sampled reward of each step of a GRPO run of the small model on `reward`."""
    cfg = compose_config(
        *SMALL_MODEL, *LEARNABLE_GRPO, f"trainer.max_steps={steps}", "trainer.ckpt_every=1000", *overrides,
        output_dir=output_dir,
    )  # fmt: skip
    cfg.stage.reward = OmegaConf.create({reward: {"weight": 1.0}})
    run_stage(cfg)
    rewards = list(logged(output_dir, "train/reward/mean").values())
    assert len(rewards) == steps // int(cfg.stage.num_iterations)
    return rewards


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_raises_the_sampled_reward(tmp_path, monkeypatch, case):
    monkeypatch.setitem(REWARD_FUNCTIONS, "leading_space", leading_space)
    reward = _sampled_reward(tmp_path, "leading_space", 60, *GRPO_CASES[case])
    assert mean(reward[:3]) <= 0.3, reward[:3]
    assert mean(reward[-5:]) >= 0.8, reward


def test_training_only_the_top_entropy_fifth_of_tokens_raises_the_sampled_reward(tmp_path, monkeypatch):
    """The "80/20" rule trains the uncertain tokens alone, so its reward here depends on every token
    (`space_share`): with `leading_space`, the first token's entropy ranks low and it would never train. As the
    trained tokens grow confident, others take their place at the top (seeds 0-2 end at 0.96-0.99)."""
    monkeypatch.setitem(REWARD_FUNCTIONS, "space_share", space_share)
    reward = _sampled_reward(
        tmp_path, "space_share", 80, "stage.aggregation=token_mean", "stage.top_entropy_quantile=0.2"
    )
    assert mean(reward[:3]) <= 0.3, reward[:3]
    assert mean(reward[-5:]) >= 0.8, reward


def _one_step_functions(buggy_fraction: float) -> list[dict]:
    """The coding task's one-step problems whose amount is 1: what SFT teaches a tiny model in seconds (copying an
    amount from the prompt takes it thousands of steps)."""
    problems = synthetic_code.generate("train", 2500, min_level=1, max_level=1, buggy_fraction=buggy_fraction)
    return [problem.as_record() for problem in problems if re.search(r"(gets|gives away) 1 ", problem.prompt)]


def test_grpo_with_the_code_reward_learns_to_write_the_whole_function(tmp_path):
    """The coding task through SFT and then GRPO with the sandboxed code reward, the demo's story in code: SFT on
    each prompt's whole function once and a version that forgets its step three times leaves a model whose
    functions run and mostly fail their tests; GRPO makes it write the whole function (seeds 0-2 start at 0.19-0.20
    and end at 0.86-0.94 over the last five steps)."""
    complete, forgetful = _one_step_functions(0.0), _one_step_functions(1.0)
    rows = [row for replies in zip(complete, forgetful, forgetful, forgetful) for row in replies]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["data=jsonl", f"data.train={data}", "data.val=null", "heldout.num_prompts=0", "trainer.ckpt_every=1000"]
    sft = run_stage(
        compose_config(
            *SMALL_MODEL, "model.config.hidden_size=128", "model.config.intermediate_size=256", *common, "stage=sft",
            "data.max_sequence_length=192", "data.batch_size=16", "data.micro_batch_size=16", "optim.lr=3e-3",
            "optim.warmup_steps=5", "trainer.max_steps=300", output_dir=tmp_path / "sft",
        )
    )  # fmt: skip
    run_stage(
        compose_config(
            *common, *LEARNABLE_GRPO, "reward@stage.reward=code", "stage.sampling.max_new_tokens=64", "optim.lr=3e-4",
            "model=pretrained", f"model.name_or_path={sft.export_dir}", "trainer.max_steps=30",
            output_dir=tmp_path / "grpo",
        )
    )  # fmt: skip
    reward = list(logged(tmp_path / "grpo", "train/reward/mean").values())
    assert reward[0] <= 0.3, reward
    assert mean(reward[-5:]) >= 0.8, reward


def _parity_pairs(path, numbers):
    rows = [
        {
            "prompt": f"Is {n} even or odd?",
            "chosen": "even" if n % 2 == 0 else "odd",
            "rejected": "odd" if n % 2 == 0 else "even",
        }
        for n in numbers
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _greedy_prefers_chosen(export, rows) -> float:
    chat, model = ChatFormat(AutoTokenizer.from_pretrained(export)), AutoModelForCausalLM.from_pretrained(export)
    prompts = [chat.prompt(r["prompt"]) for r in rows]
    groups = HFEngine(model, chat).generate(prompts, SamplingParams(1, 0.0, 1.0, 4), seed=0)
    return mean(float(group[0].text == row["chosen"]) for group, row in zip(groups, rows))


def test_dpo_learns_to_prefer_the_chosen_answers(tmp_path):
    """With the RPO term, as the demo runs it: the chosen answers become what greedy decoding says."""
    _parity_pairs(tmp_path / "train.jsonl", range(0, 400))
    val = _parity_pairs(tmp_path / "val.jsonl", range(1000, 1064))
    steps = 60
    run_dir = tmp_path / "run"
    cfg = compose_config(
        *SMALL_MODEL,
        "stage=dpo",
        "stage.pairs=file",
        "stage.rpo_alpha=1.0",
        f"data.train={tmp_path / 'train.jsonl'}",
        f"data.val={tmp_path / 'val.jsonl'}",
        "data.max_sequence_length=64",
        "data.batch_size=16",
        "data.micro_batch_size=16",
        "optim.lr=3e-3",
        "optim.warmup_steps=0",
        "optim.min_lr_ratio=1.0",
        f"trainer.max_steps={steps}",
        "trainer.val_every=30",
        "trainer.ckpt_every=1000",
        "trainer.num_sanity_val_steps=1",
        "heldout.num_prompts=0",
        output_dir=run_dir,
    )
    result = run_stage(cfg)
    accuracy = logged(run_dir, "val/rewards/accuracies")
    margins = logged(run_dir, "val/rewards/margins")
    # at step 0 the policy is the reference: every margin is 0 and the implicit-reward accuracy is 0
    assert accuracy[max(accuracy)] >= 0.9, accuracy
    assert margins[max(margins)] > margins[min(margins)] > 0, margins
    assert _greedy_prefers_chosen(result.export_dir, val) >= 0.9
