"""Keys that no schema knows, explained in one line: a misspelt key names the closest known ones, a renamed key
names its new home. Hydra refuses an unknown key when it composes (`trainer.max_step=2`), but accepts one added
with `+` (`+trainer.max_step=2`, as its own error message suggests), which would then be silently ignored:
`check_known_keys` refuses those too. The groups meant to stay open take any key: `model.config` (an HF config's
fields), `data.fields`, `stage.reward`, `logger` and `callbacks` (their `_target_`s' arguments), and a pipeline's
`stages` and `data` (checked when each stage is composed).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from thinkforge.errors import ConfigError

_TO_SAMPLING = {"num_samples": "sampling.num_samples", "temperature": "sampling.temperature", "top_p": "sampling.top_p"}
_VLLM_KNOBS = (
    "dtype",
    "max_model_len",
    "enforce_eager",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "cpu_kv_cache_gib",
    "max_num_batched_tokens",
    "sleep_while_training",
)
#: (schema, old key) -> the key that took its place (a path from the same node), or a sentence saying what did
RENAMED: dict[tuple[str, str], str] = {
    ("GRPOConfig", "group_size"): "sampling.num_samples",
    ("GRPOConfig", "temperature"): "sampling.temperature",
    ("GRPOConfig", "top_p"): "sampling.top_p",
    ("GRPOConfig", "max_completion_length"): "sampling.max_new_tokens",
    ("GRPOConfig", "loss_type"): (
        "is two knobs now, surrogate (clip|gspo|cispo) and aggregation (token_mean|sequence_mean|constant): "
        "grpo is aggregation=sequence_mean, dapo token_mean, dr_grpo constant (each with surrogate=clip), "
        "cispo is surrogate=cispo"
    ),
    (
        "GRPOConfig",
        "importance_sampling_level",
    ): "is the surrogate now: sequence is surrogate=gspo, token surrogate=clip",
    ("DPOConfig", "rollout"): "sampling",
    ("SFTConfig", "rollout"): "sampling (and its max_per_prompt is max_per_prompt)",
    **{("HeldOutConfig", old): new for old, new in _TO_SAMPLING.items()},
    ("HeldOutConfig", "max_new_tokens"): "sampling.max_new_tokens",
    ("HeldOutConfig", "batch_size"): "the engine's: rollout.hf.batch_size",
    **{("EvalConfig", old): new for old, new in _TO_SAMPLING.items()},
    ("EvalConfig", "max_new_tokens"): "sampling.max_new_tokens",
    ("EvalConfig", "batch_size"): "the engine's: rollout.hf.batch_size",
    **{("RolloutConfig", knob): f"vllm.{knob}" for knob in _VLLM_KNOBS},
    ("DataConfig", "max_length"): (
        "was split by what it bounds: data.max_sequence_length (midtrain, SFT and DPO sequences), "
        "stage.max_prompt_length (GRPO's prompts), heldout.sampling.max_new_tokens (held-out generation)"
    ),
}


def schema_of(node: Any) -> type | None:
    """The dataclass a config node was built from, or None for an open node."""
    if not isinstance(node, DictConfig):
        return None
    kind = OmegaConf.get_type(node)
    return kind if kind is not None and dataclasses.is_dataclass(kind) else None


def explain_unknown(key: str, schema: type) -> str:
    """One line for a key `schema` does not have: where a renamed key went, else the closest known keys."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    renamed = RENAMED.get((schema.__name__, name))
    if renamed is not None:
        if " " in renamed:
            return f"{key}: {renamed}"
        return f"{key} is now {prefix}{renamed}"
    knobs = [knob.name for knob in dataclasses.fields(schema) if not knob.name.startswith("_")]
    close = difflib.get_close_matches(name, knobs, n=3, cutoff=0.6)
    if close:
        return f"{key}: no such key; did you mean {' or '.join(prefix + knob for knob in close)}?"
    return f"{key}: no such key in {schema.__name__}; its keys: {', '.join(knobs)}"


def unknown_keys(node: Any, path: str = "") -> list[str]:
    """Explanations of every key in `node` (recursively) that its schema does not list."""
    schema = schema_of(node)
    if schema is None:
        return []
    fields = {knob.name for knob in dataclasses.fields(schema)}
    found = []
    for key in node:
        full = f"{path}{key}"
        if key not in fields:
            found.append(explain_unknown(full, schema))
        elif not OmegaConf.is_missing(node, key):
            found += unknown_keys(node._get_node(key), f"{full}.")
    return found


def check_known_keys(cfg: DictConfig) -> None:
    problems = unknown_keys(cfg)
    if problems:
        raise ConfigError(problems[0])


def explain_composition_error(error: BaseException) -> str | None:
    """One line for what Hydra or OmegaConf refused while composing a config, or None when it is something else:
    an unknown key (its closest known ones, or where it moved), an unknown option of a group, a value of the wrong
    type, an override that does not parse."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    for link in chain:
        if isinstance(link, (ConfigKeyError, ConfigAttributeError)) and getattr(link, "full_key", None):
            schema = getattr(link, "object_type", None)
            if isinstance(schema, type) and dataclasses.is_dataclass(schema):
                return explain_unknown(str(link.full_key), schema)
        if isinstance(link, ValidationError) and getattr(link, "full_key", None):
            return f"{link.full_key}: {first_line(str(link.msg))}"
    for link in chain:
        if isinstance(link, MissingConfigException):
            return missing_option(str(link))
        if isinstance(link, (OverrideParseException, OmegaConfBaseException)):
            return first_line(str(link))
    if isinstance(error, HydraException):
        return " ".join(str(error).split())
    return None


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def missing_option(message: str) -> str:
    """Hydra's "Could not find 'stage/grpoo'" with its list of options, as one line naming them."""
    found = re.search(r"Could not find '([^']+)'", message)
    options = re.findall(r"^\t(\S+)$", message, flags=re.MULTILINE)
    if not found:
        return first_line(message)
    group, _, option = found.group(1).rpartition("/")
    if not group:
        return f"{option}: no such config"
    close = difflib.get_close_matches(option, options, n=1)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={option}: no such option; {hint}options: {', '.join(options)}"
