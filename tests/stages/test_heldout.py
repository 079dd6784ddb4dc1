"""Held-out points during a stage (`heldout.every_n_steps`), the best one kept (`heldout.keep_best`), and the
samples each point shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, logged, run_cli

from thinkforge.stages.base import Stage
from thinkforge.stages.heldout import describe_points, last_due_point
from thinkforge.training import run_stage

GRPO_POINTS = [
    *FAST,
    "experiment=demo_grpo",
    "stage.sampling.num_samples=4",
    "stage.sampling.max_new_tokens=16",
    "data.batch_size=4",
    "data.micro_batch_size=2",
    "heldout.num_prompts=4",
    "heldout.sampling.max_new_tokens=16",
    "heldout.every_n_steps=2",
    "heldout.keep_best=accuracy",
]
#: SFT with held-out points whose scores are scripted by step (a tiny model scores 0 on every real one)
# a constant learning rate after warmup: runs of different lengths take the same steps
SFT_POINTS = [
    *FAST,
    "stage=sft",
    "trainer.max_steps=6",
    "optim.min_lr_ratio=1.0",
    "heldout.num_prompts=4",
    "heldout.every_n_steps=2",
]
SCRIPTED = {2: 0.25, 4: 0.75, 6: 0.5}


@pytest.mark.parametrize(
    ("every", "per_batch", "expected"),
    [
        (4, 1, {3: 0, 4: 4, 5: 4, 8: 8, 11: 8}),
        # GRPO with 3 iterations per batch: batches end at 3, 6, 9, 12; a point follows the batch that passes 4, 8, 12
        (4, 3, {3: 0, 6: 6, 7: 6, 9: 9, 12: 12}),
    ],
)
def test_a_point_follows_the_batch_that_reaches_or_passes_a_multiple(every, per_batch, expected):
    assert {step: last_due_point(step, every, per_batch) for step in expected} == expected


@pytest.mark.parametrize(
    ("overrides", "every"),
    [
        (["experiment=demo_grpo", "trainer.max_steps=40"], 8),
        (["experiment=demo_grpo", "trainer.max_steps=6"], 2),
        (["stage=dpo", "trainer.max_steps=20"], 4),
        (["stage=sft", "trainer.max_steps=40"], 0),
        (["stage=sft", "trainer.max_steps=40", "heldout.every_n_steps=10"], 10),
        (["experiment=demo_grpo", "trainer.max_steps=40", "heldout.num_prompts=0"], 0),
    ],
)
def test_rl_stages_score_a_handful_of_points_by_default(overrides, every, tmp_path):
    from thinkforge.config import validate
    from thinkforge.training import build_stage

    assert build_stage(validate(compose_config(*overrides, output_dir=tmp_path))).heldout_every() == every


def test_the_summary_line_names_the_best_point_and_what_the_last_scored():
    history = [
        {"step": 8, "accuracy": 0.5},
        {"step": 16, "accuracy": 0.7},
        {"step": 24, "accuracy": 0.7},
        {"step": 40, "accuracy": 0.6},
    ]
    line = describe_points(history, {"accuracy": 0.25}, "accuracy")
    assert line == (
        "held-out pass@1 (greedy): start 25.0%, step 8 50.0%, step 16 70.0%, step 24 70.0%, step 40 60.0%; "
        "best accuracy 70.0% at step 16 (kept in export_best/), the last step 40 60.0%"
    )
    assert describe_points(history[-1:], {}, None) is None


def test_keep_best_must_name_a_measured_metric():
    from thinkforge.config import validate
    from thinkforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"heldout.keep_best: must be one of accuracy \(a held-out metric"):
        validate(compose_config("stage=grpo", "heldout.keep_best=pass@8", "heldout.pass_k=8"))
    validate(
        compose_config("stage=grpo", "heldout.keep_best=pass@8", "heldout.pass_k=8", "heldout.pass_k_at_points=true")
    )


def test_grpo_scores_points_during_training_and_keeps_the_best(tmp_path):
    run = tmp_path / "run"
    result = run_cli(*GRPO_POINTS, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    points = logged(run, "heldout/accuracy")
    assert sorted(points) == [2, 4] and sorted(logged(run, "heldout_start/accuracy")) == [0]
    best = json.loads((run / "heldout_best.json").read_text())
    assert best["accuracy"] == max(points.values())
    assert best["step"] == min(step for step, value in points.items() if value == best["accuracy"])
    assert (run / "export_best" / "config.json").exists() and (run / "export_best" / "model.safetensors").exists()
    assert f"best accuracy {best['accuracy']:.1%} at step {best['step']}" in result.stdout
    samples = [json.loads(line) for line in (run / "heldout_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and set(samples[0]) == {"prompt", "completion", "gold", "correct", "finished", "tokens"}
    assert sum(sample["correct"] for sample in samples) / 4 == pytest.approx(points[4])
    assert (run / "curves.png").exists()


@pytest.fixture
def scripted_scores(monkeypatch):
    """Held-out accuracy by step, as `SCRIPTED` says; everything else about the points runs for real."""

    def evaluate(self, filename="heldout.json", with_pass_k=True):
        metrics = {"accuracy": SCRIPTED.get(self.global_step, 0.0), "eos_rate": 1.0, "mean_length": 10.0}
        if filename:
            (Path(self.run.output_dir) / filename).write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(Stage, "evaluate_heldout", evaluate)


def weights(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_keep_best_exports_the_best_points_weights_and_a_resume_keeps_them(tmp_path, scripted_scores):
    whole = tmp_path / "whole"
    result = run_stage(compose_config(*SFT_POINTS, "heldout.keep_best=accuracy", output_dir=whole))
    assert json.loads((whole / "heldout_best.json").read_text())["step"] == 4
    assert result.metrics["heldout/accuracy"] == 0.5, "the stage's own scores stay the last step's"
    at_four = tmp_path / "four"
    run_stage(compose_config(*SFT_POINTS, "trainer.max_steps=4", output_dir=at_four))
    best = weights(whole / "export_best")
    assert best.keys() == weights(at_four / "export").keys()
    assert all(torch.equal(best[name], tensor) for name, tensor in weights(at_four / "export").items())

    cut = tmp_path / "cut"
    kept = [*SFT_POINTS, "heldout.keep_best=accuracy", "trainer.ckpt_every=1"]
    run_stage(compose_config(*kept, "trainer.max_steps=3", output_dir=cut))
    run_stage(compose_config(*kept, output_dir=cut))
    assert json.loads((cut / "heldout_best.json").read_text()) == json.loads((whole / "heldout_best.json").read_text())
    assert all(torch.equal(best[name], tensor) for name, tensor in weights(cut / "export_best").items())
    # the cut run's own end (step 3) was a real point too; the points on the uninterrupted run's steps agree
    assert {step: logged(cut, "heldout/accuracy")[step] for step in SCRIPTED} == logged(whole, "heldout/accuracy")
