"""One source for each default: the schema dataclass. A YAML sets only what differs from it, and a function that
takes a knob as a keyword either has no default for it or the schema's."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from thinkforge import losses
from thinkforge.benchmarks import EvalConfig
from thinkforge.config import (
    DataConfig,
    HardwareConfig,
    HeldOutConfig,
    ModelConfig,
    PipelineConfig,
    TrainConfig,
    config_dir,
)
from thinkforge.objectives import PolicyObjective
from thinkforge.rollout.settings import RolloutConfig
from thinkforge.stage_configs import STAGE_SCHEMAS, DPOConfig, GRPOConfig

CONF = Path(config_dir())
#: the schema of each group's options (a `# @package _global_` stage option maps its top-level keys instead)
GROUP_SCHEMAS = {"data": DataConfig, "model": ModelConfig, "hardware": HardwareConfig, "rollout": RolloutConfig}
#: the schema of each top-level key of a global-package option or an entry point's own YAML
KEY_SCHEMAS = {
    "data": DataConfig,
    "model": ModelConfig,
    "hardware": HardwareConfig,
    "rollout": RolloutConfig,
    "heldout": HeldOutConfig,
}
ENTRY_SCHEMAS = {"train": TrainConfig, "pipeline": PipelineConfig, "eval": EvalConfig, "doctor": TrainConfig}


def schema_defaults(schema: type) -> DictConfig:
    return OmegaConf.structured(schema)


def restated(node: Any, defaults: DictConfig, path: str) -> Iterator[str]:
    """Every key of `node` whose value equals the schema's default, recursing into nested schema nodes."""
    for key, value in node.items():
        if key in ("defaults", "hydra") or key not in defaults:
            continue
        default = defaults._get_node(key)
        if (
            isinstance(value, dict)
            and isinstance(default, DictConfig)
            and OmegaConf.get_type(default) not in (dict, None)
        ):
            yield from restated(value, default, f"{path}.{key}")
        elif not OmegaConf.is_missing(defaults, key) and value == OmegaConf.to_container(defaults, resolve=False)[key]:
            yield f"{path}.{key}: {value!r}"


def option_cases() -> Iterator[tuple[str, dict[str, Any], DictConfig]]:
    """(file, its YAML, the schema it sets) for every schema-backed option and entry point."""
    for group, schema in GROUP_SCHEMAS.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}/{path.name}", path, schema_defaults(schema)
    for path in sorted((CONF / "stage").glob("*.yaml")):
        yield f"stage/{path.name}", path, None
    for name, schema in ENTRY_SCHEMAS.items():
        yield f"{name}.yaml", CONF / f"{name}.yaml", schema_defaults(schema)


def load_yaml(path: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


@pytest.mark.parametrize(
    "name,path,defaults", list(option_cases()), ids=lambda case: case if isinstance(case, str) else ""
)
def test_no_yaml_restates_a_schema_default(name, path, defaults):
    node = load_yaml(path)
    if defaults is not None:
        found = list(restated(node, defaults, name))
    elif path.read_text().startswith("# @package _global_"):
        schemas = {**KEY_SCHEMAS, "stage": STAGE_SCHEMAS[path.stem]}
        found = [
            line
            for key, value in node.items()
            if key in schemas
            for line in restated(value, schema_defaults(schemas[key]), f"{name}:{key}")
        ]
    else:
        found = list(restated(node, schema_defaults(STAGE_SCHEMAS[path.stem]), name))
    assert not found, (
        "these restate the schema's default (delete them, or change the default in the schema):\n" + "\n".join(found)
    )


def test_restated_defaults_are_found():
    """The check itself: a YAML restating a default (nested too) is reported, one that differs is not."""
    node = {
        "max_sequence_length": 512,
        "batch_size": 32,
        "synthetic": {"num_train": 4000, "max_level": 2},
        "defaults": ["x"],
    }
    assert sorted(restated(node, schema_defaults(DataConfig), "data")) == [
        "data.max_sequence_length: 512",
        "data.synthetic.num_train: 4000",
    ]


#: functions that take schema knobs as keywords, with the schema and the names they take them under
#: (`losses.grpo_loss` keeps the defaults DESIGN.md's public API gives it; the stage passes every knob)
KEYWORD_OWNERS: dict[Callable[..., Any], tuple[type, dict[str, str]]] = {
    losses.dpo_loss: (DPOConfig, {}),
    PolicyObjective: (GRPOConfig, {}),
    losses.group_advantages: (GRPOConfig, {"scale": "advantage_scale"}),
    losses.rollout_correction: (GRPOConfig, {"mode": "rollout_correction", "cap": "rollout_correction_cap"}),
}


@pytest.mark.parametrize("function", list(KEYWORD_OWNERS), ids=lambda function: function.__name__)
def test_keyword_defaults_agree_with_the_schema(function):
    schema, aliases = KEYWORD_OWNERS[function]
    fields = {field.name: field for field in dataclasses.fields(schema)}
    wrong = []
    for parameter in inspect.signature(function).parameters.values():
        knob = aliases.get(parameter.name, parameter.name)
        if parameter.default is inspect.Parameter.empty or knob not in fields:
            continue
        if parameter.default != fields[knob].default:
            wrong.append(
                f"{function.__name__}({parameter.name}={parameter.default!r}) "
                f"but {schema.__name__}.{knob} = {fields[knob].default!r}"
            )
    assert not wrong, "\n".join(wrong)
