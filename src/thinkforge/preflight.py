"""Checks of every path a run will read, before any work: data files, model and tokenizer directories or hub
names, checkpoints, benchmark files. `dry_run` runs them too, so a recipe whose data is missing fails at once.

A model name that is not a local directory must be in the local Hugging Face cache or reachable on the hub;
offline, the run fails here with one line instead of after a minute of download retries.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Optional

from thinkforge.benchmarks import EvalConfig
from thinkforge.config import TrainConfig
from thinkforge.errors import ConfigError, require

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative (./ ~), a file suffix, or deeper than org/name."""
    return name.startswith(("/", ".", "~")) or Path(name).suffix in DATA_SUFFIXES or name.count("/") > 1


def check_data_source(source: Optional[str], key: str) -> None:
    if source is None or source == "synthetic":
        return
    if _looks_local(source):
        require(Path(source).expanduser().exists(), key, f"{source}: no such file")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def _in_hub_cache(name: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except ValueError:  # not a valid repo id
        return False


def check_model_source(name: Optional[str], key: str, filename: str, will_exist: Collection[Path] = ()) -> None:
    """A local directory (or one an earlier pipeline stage will write), or a hub id that can be loaded."""
    if name is None:
        return
    path = Path(name).expanduser()
    require(
        not ((path / "adapter_config.json").exists() and not (path / filename).exists()),
        key,
        f"{name} holds a LoRA adapter alone (model.lora.export=adapter); start from a merged export "
        "(model.lora.export=merged) or merge it onto its base with peft first",
    )
    if path.is_dir() or path.resolve() in will_exist:
        return
    require(not (path.exists() or _looks_local(name)), key, f"{name}: no such directory")
    if _in_hub_cache(name, filename) or hub_reachable():
        return
    raise ConfigError(
        f"{key}: {name} is not a local directory, not in the Hugging Face cache, and the hub cannot be reached; "
        "download it first (huggingface-cli download) or give a local path"
    )


def check_train_paths(run: TrainConfig, will_exist: Collection[Path] = ()) -> None:
    """`will_exist`: directories earlier pipeline stages will write (their exports)."""
    check_data_source(run.data.train, "data.train")
    check_data_source(run.data.val, "data.val")
    check_model_source(run.model.name_or_path, "model.name_or_path", "config.json", will_exist)
    check_model_source(run.model.tokenizer, "model.tokenizer", "tokenizer_config.json", will_exist)
    if run.ckpt_path not in (None, "last"):
        require(
            Path(run.ckpt_path).exists(), "ckpt_path", f"{run.ckpt_path}: no such checkpoint (use last, null or a path)"
        )


def check_eval_paths(cfg: EvalConfig) -> None:
    if cfg.samples_file is not None:
        require(Path(cfg.samples_file).is_file(), "samples_file", f"{cfg.samples_file}: no such file")
        return
    path = cfg.benchmark.path
    if path != "synthetic" and Path(path).suffix in DATA_SUFFIXES and not Path(path).exists():
        source = (
            "THINKFORGE_BENCHMARKS"
            if "THINKFORGE_BENCHMARKS" in os.environ
            else "benchmarks_dir (default; or set THINKFORGE_BENCHMARKS)"
        )
        raise ConfigError(
            f"benchmark.path: {path}: no such file; benchmark files are read from {source} = {cfg.benchmarks_dir}"
        )
    if cfg.model is not None:
        check_model_source(cfg.model.name_or_path, "model.name_or_path", "config.json")
        check_model_source(cfg.model.tokenizer, "model.tokenizer", "tokenizer_config.json")
