"""Rejection-sampled SFT (DeepSeek-R1's third stage): the starting model's own verified-correct, finished samples
become the replies it trains on, sampled once and read back on resume."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, compose_config, logged

from thinkforge.config import validate
from thinkforge.errors import ConfigError
from thinkforge.rewards.math import math_accuracy_many
from thinkforge.rollout.base import Rollout
from thinkforge.rollout.pairs import graded, verified_replies
from thinkforge.training import run_stage

RIGHT, WRONG = "<think>\nx\n</think>\n\\boxed{7}", "<think>\nx\n</think>\n\\boxed{8}"


def test_verified_replies_keep_distinct_finished_correct_samples_up_to_the_limit():
    texts = [[WRONG, RIGHT, RIGHT, RIGHT + " "], [RIGHT, WRONG], [WRONG, WRONG]]
    groups = [[Rollout(i, text, (1, 2), finished=True) for text in group] for i, group in enumerate(texts)]
    groups[1][0] = Rollout(1, RIGHT, (1, 2), finished=False)  # right, but cut off: it never wrote its end
    golds = ["7", "7", "7"]
    correct = graded(groups, golds, math_accuracy_many)
    replies, counts = verified_replies(
        groups, ["p0", "p1", "p2"], golds, correct, max_per_prompt=2, provenance={"source_model": "m"}
    )
    assert [(r["prompt"], r["completion"], r["provenance"]["sample"]) for r in replies] == [
        ("p0", RIGHT, 1),
        ("p0", RIGHT + " ", 3),
    ]
    assert counts == {"replies": 2, "no_correct": 2, "correct_unfinished": 1}
    assert replies[0]["provenance"] == {"source_model": "m", "prompt_index": 0, "sample": 1, "num_correct": 3,
                                        "num_samples": 4}  # fmt: skip


def test_sft_trains_on_its_own_verified_samples_and_reads_them_back(coin, tmp_path):
    export, prompts = coin
    overrides = [
        *FAST, "stage=sft", "stage.replies=rejection", "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=12",
        "data=jsonl", "model=pretrained", f"model.name_or_path={export}", f"data.train={prompts}", "data.val=null",
        "heldout.num_prompts=0", "data.batch_size=4", "data.micro_batch_size=2",
    ]  # fmt: skip
    run_stage(compose_config(*overrides, output_dir=tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "rejection_sampled_train.jsonl").read_text().splitlines()]
    golds = {i: json.loads(line)["answer"] for i, line in enumerate(prompts.read_text().splitlines())}
    assert len(rows) >= 8, "most prompts had a right sample"
    assert all(f"\\boxed{{{golds[row['provenance']['prompt_index']]}}}" in row["completion"] for row in rows)
    assert logged(tmp_path, "train/loss")
    written = (tmp_path / "rejection_sampled_train.jsonl").stat().st_mtime_ns
    run_stage(compose_config(*overrides, "trainer.max_steps=6", "ckpt_path=last", output_dir=tmp_path))
    assert (tmp_path / "rejection_sampled_train.jsonl").stat().st_mtime_ns == written, "not sampled again"


def test_rejection_sampling_answers_prompts_and_needs_a_sample():
    with pytest.raises(ConfigError, match=r"stage.format"):
        validate(compose_config("stage=sft", "stage.replies=rejection", "stage.format=messages"))
    with pytest.raises(ConfigError, match=r"stage.max_per_prompt"):
        validate(compose_config("stage=sft", "stage.replies=rejection", "stage.max_per_prompt=0"))
