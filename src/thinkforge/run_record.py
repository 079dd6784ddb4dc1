"""A run directory's record of its own config, `.hydra/config.yaml` and `.hydra/overrides.yaml`, written by the
command itself once its config, paths and data have been checked (Hydra's own writing is switched off: it rewrote
the record before any check, so a failed command left a finished run described by another config).

A command whose config differs from the record already in its directory is refused in one line, unless what
differs only continues the same run: more steps, other loggers or callbacks, where to resume from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from thinkforge.errors import ConfigError

RECORD = ".hydra"
#: keys a re-run may change and still be the same run, continued
CONTINUING = ("trainer", "logger", "callbacks", "ckpt_path", "dry_run", "heldout")


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {key: value for name, child in node.items() for key, value in flat(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): node}


def differing_keys(recorded: dict[Any, Any], current: dict[Any, Any]) -> list[str]:
    """The dotted keys whose values differ, outside the keys a continued run may change."""
    old, new = flat(recorded), flat(current)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return [key for key in keys if key.split(".")[0] not in CONTINUING]


def record_run(cfg: DictConfig, overrides: list[str], directory: Path, *, replaces_differing: bool = False) -> None:
    """Writes the record of `cfg` into `directory`. A record of another config already there is refused (a
    pipeline, whose stages keep their own fingerprints, moves it aside instead with `replaces_differing`)."""
    record = directory / RECORD
    current = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(current, dict)
    config_file = record / "config.yaml"
    if config_file.exists():
        recorded = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        assert isinstance(recorded, dict)
        differing = differing_keys(recorded, current)
        if differing and not replaces_differing:
            shown = ", ".join(differing[:4]) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
            raise ConfigError(
                f"{directory} holds a run of another config ({shown} differ): its checkpoints and export are that "
                "run's; choose another hydra.run.dir, or move that directory away"
            )
        if differing:
            shutil.move(record, record.with_name(f"{RECORD}.replaced-{config_file.stat().st_mtime:.0f}"))
    record.mkdir(parents=True, exist_ok=True)
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=False))
    (record / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def task_overrides() -> list[str]:
    """The command line's overrides, when a Hydra command is running."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def remove_if_empty(directory: Path) -> None:
    """A run directory this command made and left empty (it stopped at a check) is removed again, with the empty
    folders Hydra made above it inside the working directory (logs/<stage>/runs/...)."""
    directory, cwd = directory.resolve(), Path.cwd().resolve()
    while directory != cwd and cwd in directory.parents and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent
