"""Every config group composes and validates; bad keys and values fail before training with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import compose_config
from thinkforge.cli import config_dir
from thinkforge.config import ConfigError, validate

CONF = Path(config_dir())


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [
        (group, option)
        for group in ("model", "data", "prompt", "stage", "hardware", "logger")
        for option in group_options(group)
        if option != "multinode"  # sized by the SLURM launcher at run time: tests/test_slurm.py
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
    assert run.stage["_target_"].startswith("thinkforge.stages.")


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


def test_missing_required_data_path_is_reported():
    with pytest.raises(ConfigError, match="^data.train: is required"):
        validate(compose_config("data=jsonl"))


def test_unknown_stage_argument_is_reported(tmp_path):
    from thinkforge.train import build_stage

    run = validate(compose_config("+stage.no_such_option=1", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="no_such_option"):
        build_stage(run)


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
