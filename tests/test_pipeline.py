"""Recipes: every one composes and validates; per-stage overrides; a killed pipeline resumes without redoing work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, run_cli
from hydra import compose, initialize_config_dir

from thinkforge.cli import OPEN_KEY_OVERRIDE, config_dir
from thinkforge.errors import ConfigError
from thinkforge.pipeline import plan

RECIPES = sorted(path.stem for path in (Path(config_dir()) / "recipe").glob("*.yaml"))


def plan_recipe(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return plan(compose("pipeline", overrides=[*overrides, f"output_dir={tmp_path}"]))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe, tmp_path):
    stages = plan_recipe(tmp_path, f"recipe={recipe}")
    assert stages, recipe
    exports = {str(stage.export_dir) for stage in stages}
    for stage in stages[1:]:
        assert stage.config.model.name_or_path in exports, "each later stage starts from an earlier stage's export"
        assert stage.config.model.config is None


def test_init_from_picks_the_starting_export_and_its_upstream(tmp_path):
    stages = {s.name: s for s in plan_recipe(tmp_path, "recipe=demo")}
    assert stages["grpo"].config.model.name_or_path == str(stages["sft"].export_dir)
    changed_dpo = {s.name: s for s in plan_recipe(tmp_path, "recipe=demo", "++stages.dpo.optim.lr=1e-3")}
    assert changed_dpo["grpo"].fingerprint == stages["grpo"].fingerprint, "grpo does not depend on the dpo branch"
    assert changed_dpo["dpo"].fingerprint != stages["dpo"].fingerprint
    with pytest.raises(ConfigError, match=r"stages\.sft\.init_from"):
        plan_recipe(tmp_path, "recipe=demo", "++stages.sft.init_from=grpo")


def test_a_stage_hands_over_its_best_export_when_told_to(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.sft\.export: best needs stages\.sft\.heldout\.keep_best"):
        plan_recipe(tmp_path, "recipe=demo", "++stages.sft.export=best")
    last = {s.name: s for s in plan_recipe(tmp_path, "recipe=demo")}
    best = {
        s.name: s
        for s in plan_recipe(
            tmp_path, "recipe=demo", "++stages.sft.export=best", "++stages.sft.heldout.keep_best=accuracy"
        )
    }
    assert best["grpo"].config.model.name_or_path == str(tmp_path / "sft" / "export_best")
    assert best["dpo"].config.model.name_or_path == str(tmp_path / "sft" / "export_best")
    assert best["grpo"].fingerprint != last["grpo"].fingerprint, "another start: the stages after it run again"


def test_every_demo_stage_is_scored_on_the_same_500_held_out_prompts(tmp_path):
    for stage in plan_recipe(tmp_path, "recipe=demo"):
        assert stage.config.data.synthetic.num_val == stage.config.heldout.num_prompts == 500, stage.name
        assert (stage.config.data.synthetic.min_level, stage.config.data.synthetic.max_level) == (2, 2), stage.name


def test_pipeline_seed_moves_init_data_order_and_sampling_in_every_stage(tmp_path):
    for stage in plan_recipe(tmp_path, "recipe=demo", "seed=7"):
        assert stage.config.seed == stage.config.data.seed == stage.config.model.init_seed == 7
    default = plan_recipe(tmp_path, "recipe=demo")
    assert {s.fingerprint for s in default}.isdisjoint(
        s.fingerprint for s in plan_recipe(tmp_path, "recipe=demo", "seed=7")
    )


def test_real_recipes_keep_their_structure(tmp_path):
    deepscaler = plan_recipe(tmp_path, "recipe=deepscaler")
    assert [s.config.stage.sampling.max_new_tokens for s in deepscaler] == [8192, 16384, 24576]
    assert all(set(s.config.stage.reward) == {"math_accuracy"} for s in deepscaler)
    phi4_mini = plan_recipe(tmp_path, "recipe=phi4_mini_reasoning")
    assert [s.config.stage._target_.rsplit(".", 1)[1] for s in phi4_mini] == ["MidTraining", "SFT", "DPO", "GRPO"]
    assert phi4_mini[2].config.stage.pairs == "rollout"
    plus = plan_recipe(tmp_path, "recipe=phi4_reasoning_plus")[-1].config.stage
    assert plus.sampling.max_new_tokens == 31744 and plus.reward.cosine_length.positive_fraction == 0.8065
    assert "repetition" in plus.reward


def test_per_stage_override_reaches_only_that_stage(tmp_path):
    argument = "stages.grpo.optim.lr=1e-6"
    assert OPEN_KEY_OVERRIDE.match(argument) and not OPEN_KEY_OVERRIDE.match("recipe=demo")
    stages = {s.name: s for s in plan_recipe(tmp_path, f"++{argument}", "hardware=cpu_fsdp")}
    assert stages["grpo"].config.optim.lr == 1e-6
    assert stages["sft"].config.optim.lr != 1e-6
    assert all(s.config.hardware.devices == 2 for s in stages.values()), "pipeline-level hardware reaches every stage"


def test_bad_stage_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.sft: .*optim\.lr"):
        plan_recipe(tmp_path, "++stages.sft.optim.lr=-1")
    with pytest.raises(ConfigError, match=r"stages\.sft"):
        plan_recipe(tmp_path, "++stages.sft.optim.learning_rate=1")


def with_deepscaler_inputs(tmp_path: Path) -> str:
    """What a dry run checks exists: the recipe's data file, and a local model in place of its hub model."""
    (tmp_path / "data" / "deepscaler").mkdir(parents=True)
    (tmp_path / "data" / "deepscaler" / "train.jsonl").write_text(
        json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n"
    )
    (tmp_path / "base").mkdir()
    return f"model.name_or_path={tmp_path / 'base'}"


def test_recipes_take_lora_and_the_new_rl_objectives_from_the_command_line(tmp_path):
    """LoRA reaches every stage from the pipeline's model; GSPO is three per-stage knobs."""
    assert all(
        s.config.model.lora.rank == 16 for s in plan_recipe(tmp_path / "limo", "recipe=limo", "model.lora.rank=16")
    )
    gspo = [
        f"stages.{stage}.stage.{knob}"
        for stage in ("grpo_8k", "grpo_16k", "grpo_24k")
        for knob in ("surrogate=gspo", "epsilon_low=3e-4", "epsilon_high=4e-4")
    ]
    brief = run_cli(
        "recipe=deepscaler", with_deepscaler_inputs(tmp_path), "model.lora.rank=16", *gspo, "dry_run=true",
        f"hydra.run.dir={tmp_path}", cwd=tmp_path, program="thinkforge-pipeline",
    )  # fmt: skip
    assert brief.returncode == 0, brief.stderr[-3000:]
    stages = plan_recipe(tmp_path / "plan", "recipe=deepscaler", "model.lora.rank=16", *(f"++{o}" for o in gspo))
    assert [(s.config.stage.surrogate, s.config.model.lora.rank) for s in stages] == [("gspo", 16)] * 3


def test_the_r1_recipe_dry_runs_and_runs_end_to_end_at_demo_scale(tmp_path):
    """R1's four stages: composed with their data, and run on the tiny model (recipe=r1_demo), where the
    rejection-sampled SFT trains on the reasoning RL model's own verified samples and the table covers every stage."""
    (tmp_path / "data" / "r1").mkdir(parents=True)
    (tmp_path / "data" / "r1" / "cold_start.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "completion": "2"}))
    (tmp_path / "data" / "r1" / "prompts.jsonl").write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}))
    (tmp_path / "base").mkdir()
    brief = run_cli(
        "recipe=r1", f"model.name_or_path={tmp_path / 'base'}", "dry_run=true", f"hydra.run.dir={tmp_path}",
        cwd=tmp_path, program="thinkforge-pipeline",
    )  # fmt: skip
    assert brief.returncode == 0, brief.stderr[-3000:]
    assert "| rejection_sft | SFT | reasoning_rl | data/r1/prompts.jsonl |" in brief.stdout
    run = run_cli("recipe=r1_demo", f"hydra.run.dir={tmp_path / 'demo'}", cwd=tmp_path, program="thinkforge-pipeline")
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.split("held-out results after each stage")[1]
    assert [line.split(" | ")[0] for line in table.splitlines()[3:7]] == [
        "| cold_start", "| reasoning_rl", "| rejection_sft", "| final_rl"
    ]  # fmt: skip
    replies = (tmp_path / "demo" / "rejection_sft" / "rejection_sampled_train.jsonl").read_text().splitlines()
    assert replies and all(json.loads(reply)["provenance"]["num_correct"] >= 1 for reply in replies)


def test_dry_run_from_the_command_line(tmp_path):
    model = with_deepscaler_inputs(tmp_path)
    brief = run_cli(
        "recipe=deepscaler",
        model,
        "dry_run=true",
        "stages.grpo_16k.optim.lr=2e-6",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        program="thinkforge-pipeline",
    )
    assert brief.returncode == 0, brief.stderr[-3000:]
    assert (
        "| grpo_16k | GRPO | grpo_8k | data/deepscaler/train.jsonl | 500 | 2e-06 | prompts 1024, completions 16384 |"
        in brief.stdout
    )
    assert len(brief.stdout.splitlines()) < 10 and "# ---- stage" not in brief.stdout, (
        "one screen; the YAML with verbose"
    )
    result = run_cli(
        "recipe=deepscaler",
        model,
        "dry_run=true",
        "verbose=true",
        "stages.grpo_16k.optim.lr=2e-6",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        program="thinkforge-pipeline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("# ---- stage") == 3
    assert "lr: 2.0e-06" in result.stdout.split("stage grpo_16k")[1].split("stage grpo_24k")[0]
    assert not (tmp_path / "grpo_8k").exists(), "a dry run trains nothing"


def per_stage(stage: str, *overrides: str) -> list[str]:
    return [f"stages.{stage}.{override}" for override in overrides]


def test_killed_pipeline_resumes_without_redoing_the_first_stage(tmp_path):
    run_dir = tmp_path / "pipeline"
    args = [
        "~stages.dpo",
        "~stages.grpo",
        f"hydra.run.dir={run_dir}",
        *per_stage("midtrain", *FAST, "heldout.num_prompts=8"),
        *per_stage("sft", *FAST, "trainer.max_steps=8", "heldout.num_prompts=8"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("thinkforge-pipeline")), *args],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sft_checkpoint = run_dir / "sft" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not sft_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert sft_checkpoint.exists(), "the pipeline should have been killed during the second stage"
    assert json.loads((run_dir / "sft" / "pipeline_stage.json").read_text())["status"] == "running"
    midtrain_record = (run_dir / "midtrain" / "pipeline_stage.json").read_text()
    midtrain_export = (run_dir / "midtrain" / "export" / "model.safetensors").stat().st_mtime_ns

    rerun = run_cli(*args, cwd=tmp_path, program="thinkforge-pipeline")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "midtrain: already done" in rerun.stdout
    assert "sft: resuming from" in rerun.stdout
    assert (run_dir / "midtrain" / "pipeline_stage.json").read_text() == midtrain_record
    assert (run_dir / "midtrain" / "export" / "model.safetensors").stat().st_mtime_ns == midtrain_export
    assert json.loads((run_dir / "sft" / "pipeline_stage.json").read_text())["status"] == "done"
    assert "| sft |" in rerun.stdout and (run_dir / "summary.md").exists()
    assert (run_dir / "curves.png").stat().st_size > 10_000 and (run_dir / "sft" / "curves.png").exists()

    changed = run_cli(*args, "stages.sft.optim.lr=1e-5", cwd=tmp_path, program="thinkforge-pipeline")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "midtrain: already done" in changed.stdout
    assert any(path.name.startswith("sft.stale-") for path in run_dir.iterdir()), (
        "the old sft run is kept, not overwritten"
    )


def test_pipeline_and_eval_sweep_with_multirun(tmp_path):
    pipeline = run_cli(
        "-m",
        "dry_run=true",
        "verbose=true",
        "stages.grpo.optim.lr=1e-4,2e-4",
        f"hydra.sweep.dir={tmp_path / 'p'}",
        cwd=tmp_path,
        program="thinkforge-pipeline",
    )
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    assert pipeline.stdout.count("# ---- stage grpo") == 2
    assert "lr: 0.0001" in pipeline.stdout and "lr: 0.0002" in pipeline.stdout

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"problem": 0, "gold": "1", "completion": "<think></think>\\boxed{1}"}) + "\n")
    evaluation = run_cli(
        "-m",
        f"samples_file={samples}",
        "ks=[1]",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'e'}",
        cwd=tmp_path,
        program="thinkforge-eval",
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert sorted(p.parent.name for p in (tmp_path / "e").glob("*/summary.json")) == ["0", "1"]


def test_a_pipeline_wide_data_file_reaches_every_stage_and_a_misspelled_stage_names_the_real_ones(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n")
    stages = plan_recipe(tmp_path, "recipe=deepscaler", f"+data.train={prompts}")
    assert [s.config.data.train for s in stages] == [str(prompts)] * 3
    model = with_deepscaler_inputs(tmp_path)
    dry = run_cli(
        "recipe=deepscaler", model, f"data.train={prompts}", "dry_run=true", cwd=tmp_path, program="thinkforge-pipeline"
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert [line.split(" | ")[3] for line in dry.stdout.splitlines() if line.startswith("| grpo_")] == [
        str(prompts)
    ] * 3
    result = run_cli(
        "recipe=deepscaler",
        f"data.train={prompts}",
        "stages.grpo8k.optim.lr=1e-6",
        "dry_run=true",
        cwd=tmp_path,
        program="thinkforge-pipeline",
    )
    assert result.returncode != 0
    assert (
        "stages.grpo8k: not a stage of this recipe; its stages are grpo_8k, grpo_16k, grpo_24k"
        in result.stderr + result.stdout
    )


def test_the_table_says_where_a_stage_started_unless_it_is_a_plain_chain():
    from thinkforge.pipeline import format_table

    rows = [("midtrain", None), ("sft", "midtrain"), ("dpo", "sft"), ("grpo", "sft")]
    records = [
        {"stage": name, "from": start, "heldout": {"accuracy": 0.5}, "export": f"{name}/export"} for name, start in rows
    ]
    labels = [line.split("|")[1].strip() for line in format_table(records).splitlines()[2:]]
    assert labels == ["midtrain", "sft", "dpo (from sft)", "grpo (from sft)"]


def test_the_table_shows_the_best_point_of_a_stage_that_kept_one():
    from thinkforge.pipeline import format_table

    records = [
        {"stage": "sft", "from": None, "heldout": {"accuracy": 0.25}, "export": "sft/export"},
        {
            "stage": "grpo",
            "from": "sft",
            "heldout": {"accuracy": 0.652},
            "best": {"step": 32, "metric": "accuracy", "accuracy": 0.702},
            "export": "grpo/export_best",
        },
    ]
    header, _, sft, grpo = format_table(records).splitlines()
    assert "best held-out point" in header
    assert "| accuracy 70.2% (step 32) |" in grpo and "| - |" in sft
