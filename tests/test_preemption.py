"""Stopping when asked (issue 36): a SIGTERM in the middle of a GRPO rollout or of the starting held-out scoring
ends the command within that generation with exit code 130, keeps a checkpoint of the last completed step, and
the same command then resumes to the very losses of a run that was never stopped."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FAST, logged, run_cli

from thinkforge.errors import Interrupted
from thinkforge.pipeline import PlannedStage, run_one


def grpo_run(coin, directory, *overrides):
    export, prompts = coin
    return run_cli(
        *FAST,
        "experiment=demo_grpo",
        "model=pretrained",
        f"model.name_or_path={export}",
        "data=jsonl",
        f"data.train={prompts}",
        "data.val=null",
        "data.batch_size=4",
        "data.micro_batch_size=2",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=12",
        "trainer.max_steps=4",
        "trainer.ckpt_every=100",
        *overrides,
        f"hydra.run.dir={directory}",
        cwd=directory.parent,
    )


def test_sigterm_mid_rollout_saves_the_last_step_and_resumes_to_the_same_losses(coin, tmp_path):
    full = grpo_run(coin, tmp_path / "full", "heldout.num_prompts=0")
    assert full.returncode == 0, full.stderr[-3000:]
    stop = ["+callbacks.term._target_=faults.SigtermDuringRollout", "+callbacks.term.step=2"]
    cut = grpo_run(coin, tmp_path / "cut", "heldout.num_prompts=0", *stop)
    assert cut.returncode == 130, cut.stderr[-3000:]
    assert "interrupted by SIGTERM" in cut.stderr.splitlines()[-1]
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").exists(), "the last completed step (2) is kept"
    assert sorted(logged(tmp_path / "cut", "train/loss")) == [0, 1], "step 2 was stopped inside its rollout"
    assert (tmp_path / "cut" / "curves.png").exists(), "curves are drawn from what the log holds"
    resumed = grpo_run(coin, tmp_path / "cut", "heldout.num_prompts=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = logged(tmp_path / "full", "train/loss")
    assert any(losses.values()), "a run that trains on nothing would show nothing"
    assert logged(tmp_path / "cut", "train/loss") == losses


def test_sigterm_mid_heldout_keeps_nothing_half_done_and_resumes_to_the_same_losses(coin, tmp_path):
    scored = ["heldout.num_prompts=8", "heldout.sampling.max_new_tokens=12", "trainer.max_steps=2"]
    full = grpo_run(coin, tmp_path / "full", *scored)
    assert full.returncode == 0, full.stderr[-3000:]
    stop = ["+callbacks.term._target_=faults.SigtermDuringHeldOut"]
    cut = grpo_run(coin, tmp_path / "cut", *scored, *stop)
    assert cut.returncode == 130, cut.stderr[-3000:]
    assert not (tmp_path / "cut" / "heldout_start.json").exists(), "a half-scored evaluation is not kept"
    resumed = grpo_run(coin, tmp_path / "cut", *scored)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = json.loads((tmp_path / "cut" / "heldout_start.json").read_text())
    assert start["accuracy"] == json.loads((tmp_path / "full" / "heldout_start.json").read_text())["accuracy"]
    assert logged(tmp_path / "cut", "train/loss") == logged(tmp_path / "full", "train/loss")


def test_the_pipeline_says_interrupted_when_a_stage_was_stopped(tmp_path, monkeypatch):
    from thinkforge import pipeline

    stage = PlannedStage("grpo", None, tmp_path / "grpo", "f" * 16)  # type: ignore[arg-type]
    monkeypatch.setattr(pipeline, "own_process_command", lambda cfg, directory: [sys.executable, "-c", "exit(130)"])
    with pytest.raises(Interrupted):
        run_one(stage)
    assert json.loads((tmp_path / "grpo" / "pipeline_stage.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(pipeline, "own_process_command", lambda cfg, directory: [sys.executable, "-c", "exit(3)"])
    with pytest.raises(pipeline.StageFailed):
        run_one(stage)
    record = json.loads((tmp_path / "grpo" / "pipeline_stage.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 3
