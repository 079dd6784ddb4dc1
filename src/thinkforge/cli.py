"""Console entry points: thin Hydra mains over `thinkforge.train`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig

from thinkforge.config import register_configs


def config_dir() -> str:
    """The `conf/` shipped inside the wheel, or the repository's own `conf/` for an editable install."""
    packaged = resources.files("thinkforge") / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train_main(cfg: DictConfig) -> None:
    from thinkforge.train import run_stage

    run_stage(cfg)
