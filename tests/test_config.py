"""Every config group composes and validates; bad keys and values fail before training with a clear message."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST, compose_config, run_cli, run_cli_command
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from thinkforge.cli import config_dir
from thinkforge.config import validate
from thinkforge.errors import ConfigError

CONF = Path(config_dir())


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [
        (group, option)
        for group in ("model", "data", "prompt", "stage", "hardware", "logger")
        for option in group_options(group)
        if option != "multinode"  # sized by the SLURM launcher at run time: tests/runs/test_slurm.py
    ],
)
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if option == "jsonl":
        overrides.append("data.train=/tmp/some.jsonl")
    if option == "pretrained":
        overrides.append("model.name_or_path=/tmp/some-export")
    if option == "fsdp":
        overrides += ["data.batch_size=64", "data.micro_batch_size=8"]
    run = validate(compose_config(*overrides))
    assert run.stage._target_.startswith("thinkforge.stages.")


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_config(f"experiment={experiment}", "data.train=/tmp/some.jsonl")
    validate(cfg)


def test_stage_targets_resolve_to_stage_classes():
    from hydra.utils import get_class

    from thinkforge.stages.base import Stage

    for option in group_options("stage"):
        target = compose_config(f"stage={option}").stage._target_
        assert issubclass(get_class(target), Stage)


def test_unknown_key_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config("optim.lrr=1e-3")


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        compose_config("trainer.max_steps=many")


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.batch_size=10", "data.batch_size"),
        ("data.overflow=wrap", "data.overflow"),
        ("model.attn_implementation=flash", "model.attn_implementation"),
        ("hardware.strategy=ddp", "hardware.strategy"),
        ("optim.lr=-1", "optim.lr"),
        ("model.name_or_path=some/model", "model"),
        ("hardware=cpu_fsdp", "data.batch_size"),
    ],
)
def test_bad_value_names_its_key(override, key):
    extra = ["data.batch_size=6", "data.micro_batch_size=2"] if override == "hardware=cpu_fsdp" else []
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate(compose_config(override, *extra))


def test_the_old_data_max_length_names_the_keys_that_replaced_it(tmp_path):
    """data.max_length meant four things; a config that still sets it stops with the new names, from the CLI too."""
    with pytest.raises(
        ConfigError, match=r"^data.max_length: was split .*data.max_sequence_length.*stage.max_prompt_length"
    ):
        validate(compose_config("stage=grpo", "+data.max_length=1024"))
    result = run_cli("stage=sft", "data.max_length=1024", "dry_run=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "error: data.max_length: was split" in result.stderr, result.stderr[-2000:]


def test_missing_required_data_path_is_reported():
    with pytest.raises(ConfigError, match=r"^data.train: is required"):
        validate(compose_config("data=jsonl"))


def test_unknown_stage_argument_is_reported(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^stage.no_such_option: no such key in MidTrainingConfig; its keys: documents"
    ):
        validate(compose_config("+stage.no_such_option=1", output_dir=tmp_path))


def test_every_value_is_overridable():
    cfg = compose_config("model.config.hidden_size=64", "data.synthetic.max_level=2", "hardware.devices=1")
    assert cfg.model.config.hidden_size == 64 and cfg.data.synthetic.max_level == 2
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config("model.config.no_such_field_in_yaml=1")


@pytest.mark.parametrize("option", group_options("logger"))
def test_every_logger_config_instantiates(option, tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import Logger

    cfg = compose_config(f"logger={option}", output_dir=tmp_path)
    loggers = [instantiate(entry) for entry in cfg.logger.values()]
    assert loggers and all(isinstance(logger, Logger) for logger in loggers)


# One bad value per knob family of each stage: (stage, override, the key the error must name).
BAD_STAGE_VALUES = [
    ("midtrain", "stage.documents=html", "stage.documents"),
    ("sft", "stage.format=sharegpt", "stage.format"),
    ("sft", "data.overflow=split", "data.overflow"),
    ("dpo", "stage.loss_type=ppo", "stage.loss_type"),
    ("dpo", "stage.beta=-1", "stage.beta"),
    ("dpo", "stage.label_smoothing=0.5", "stage.label_smoothing"),
    ("dpo", "stage.rpo_alpha=-0.1", "stage.rpo_alpha"),
    ("dpo", "stage.pairs=web", "stage.pairs"),
    ("dpo", "stage.sampling.num_samples=1", "stage.sampling.num_samples"),
    ("dpo", "stage.sampling.temperature=0", "stage.sampling.temperature"),
    ("grpo", "stage.surrogate=ppo", "stage.surrogate"),
    ("grpo", "stage.aggregation=dapo", "stage.aggregation"),
    ("grpo", "stage.advantage_scale=rank", "stage.advantage_scale"),
    ("grpo", "stage.sampling.num_samples=1", "stage.sampling.num_samples"),
    ("grpo", "stage.num_iterations=0", "stage.num_iterations"),
    ("grpo", "stage.epsilon_high=-0.1", "stage.epsilon_low/epsilon_high"),
    ("grpo", "stage.beta=-1", "stage.beta"),
    ("grpo", "stage.sampling.top_p=1.5", "stage.sampling.top_p"),
    ("grpo", "stage.sampling.max_new_tokens={5:64}", "stage.sampling.max_new_tokens"),
    ("grpo", "stage.sampling.max_new_tokens=0", "stage.sampling.max_new_tokens"),
    ("grpo", "stage.sampling.temperature=0", "stage.sampling.temperature"),
    ("grpo", "stage.max_refills=-1", "stage.max_refills"),
    ("grpo", "+stage.reward.helpfulness={weight:1}", "stage.reward.helpfulness"),
]


@pytest.mark.parametrize("stage,override,key", BAD_STAGE_VALUES)
def test_every_stage_knob_is_checked_at_validation_naming_its_key(stage, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        validate(compose_config(f"stage={stage}", override))


def test_a_misspelt_stage_knob_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="loss_typ"):
        compose_config("stage=grpo", "stage.loss_typ=dapo")


@pytest.mark.parametrize(
    "program,override,key",
    [
        ("thinkforge-train", ["stage=grpo", "stage.surrogate=ppo"], "stage.surrogate"),
        ("thinkforge-train", ["stage=dpo", "stage.beta=-1"], "stage.beta"),
        ("thinkforge-pipeline", ["stages.grpo.stage.surrogate=ppo"], "stages.grpo: stage.surrogate"),
    ],
)
def test_dry_runs_reject_a_bad_stage_value_in_one_line_before_any_stage_runs(program, override, key, tmp_path):
    started = time.perf_counter()
    result = run_cli(*override, "dry_run=true", cwd=tmp_path, program=program)
    assert time.perf_counter() - started < 30
    assert result.returncode == 2 and result.stderr.startswith(f"error: {key}: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert not [path for path in tmp_path.glob("logs/pipeline/*/*") if path.is_dir() and path.name != ".hydra"], (
        "no stage ran"
    )


def test_user_errors_are_one_line_with_exit_2_and_hydra_full_error_shows_the_traceback(tmp_path):
    malformed = tmp_path / "chats.jsonl"
    malformed.write_text('{"prompt": "2+2?", "completion": "4"}\n{"prompt": "3+3?"\n')
    cases = {
        "malformed row": (
            ["data=jsonl", f"data.train={malformed}", "data.val=null", *FAST],
            f"error: {malformed}: row 2: invalid JSON: Expecting ',' delimiter at column 18",
        ),
        "missing data file": (
            ["data=jsonl", f"data.train={tmp_path}/missing.jsonl"],
            f"error: data.train: {tmp_path}/missing.jsonl: no such file",
        ),
        "missing model directory": (
            ["model=pretrained", f"model.name_or_path={tmp_path}/export"],
            f"error: model.name_or_path: {tmp_path}/export: no such directory",
        ),
        "missing checkpoint": (
            [f"ckpt_path={tmp_path}/last.ckpt"],
            f"error: ckpt_path: {tmp_path}/last.ckpt: no such checkpoint",
        ),
    }
    for case, (overrides, message) in cases.items():
        result = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2, (case, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1].startswith(message), (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, case
    traced = subprocess.run(
        [*run_cli_command("thinkforge-train"), "data=jsonl", f"data.train={tmp_path}/missing.jsonl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert traced.returncode == 1 and "Traceback" in traced.stderr


def test_a_recipe_whose_data_files_are_missing_fails_its_dry_run_naming_them(tmp_path):
    result = run_cli("recipe=r1_zero", "dry_run=true", cwd=tmp_path, program="thinkforge-pipeline")
    assert result.returncode == 2 and result.stderr.startswith(
        "error: stages.grpo: data.train: data/r1_zero/train.jsonl: no such file"
    )
    (tmp_path / "data" / "r1_zero").mkdir(parents=True)
    (tmp_path / "data" / "r1_zero" / "train.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    local_model = tmp_path / "base"
    local_model.mkdir()
    ok = run_cli(
        "recipe=r1_zero",
        f"model.name_or_path={local_model}",
        "dry_run=true",
        cwd=tmp_path,
        program="thinkforge-pipeline",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_misspelt_key_is_one_line_naming_the_closest_and_a_plus_key_is_refused_too(tmp_path):
    for args, message in (
        (["trainer.max_step=2"], "error: trainer.max_step: no such key; did you mean trainer.max_steps?"),
        (["+trainer.max_step=2"], "error: trainer.max_step: no such key; did you mean trainer.max_steps?"),
        (["stage=grpoo"], "error: stage=grpoo: no such option; did you mean stage=grpo?"),
        (["stage=grpo", "stage.group_size=4"], "error: stage.group_size is now stage.sampling.num_samples"),
    ):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr[-2000:])
        assert result.stderr.startswith(message), (args, result.stderr)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [(["stage=dpo"], "rollout DPO's pairs"), (["stage=sft", "stage.replies=rejection"], "rejection-sampled replies")],
)
def test_a_stage_that_samples_one_turn_rows_refuses_tools_in_one_line(overrides, named):
    with pytest.raises(ConfigError, match=f"tools.tool.*{named}.*take no tools"):
        validate(compose_config(*overrides, "tools=python"))
