"""The doctor's short training runs: the user's config with a few overrides, trained by `run_stage` itself (or as
its own `thinkforge-train` process under FSDP) in the doctor's directory, logged by the project's CSV logger."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from thinkforge.config import config_dir, validate
from thinkforge.csv_log import read_csv_log
from thinkforge.training import own_process_command, run_stage

Steps = dict[int, dict[str, float]]


class SimulatedKill(Exception):
    """Stands for a killed run: raised before a step, after the checkpoint of the step before was written."""


class InterruptAt(Callback):
    """Kills the run (as `SimulatedKill`) just before optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, stage: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKill(f"interrupted at step {self.step}")


def csv_logger(directory: Path) -> DictConfig:
    """`conf/logger/csv.yaml` (the run's own CSV logger settings) writing under `directory`."""
    logger = OmegaConf.load(Path(config_dir()) / "logger" / "csv.yaml")
    assert isinstance(logger, DictConfig)
    logger.csv.save_dir = str(directory)
    return logger


def with_values(cfg: DictConfig, directory: Path, overrides: Sequence[str]) -> DictConfig:
    """A copy of `cfg` with dotted overrides, writing to `directory`, without held-out evaluation or validation."""
    updated = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"output_dir={directory}",
                "heldout.num_prompts=0",
                "trainer.val_every=100000",
                "trainer.log_every=1",
                "model.dtype=float32",
                "ckpt_path=last",
                *overrides,
            ]
        ),
    )
    assert isinstance(updated, DictConfig)
    with open_dict(updated):
        updated.logger = csv_logger(directory)
    return updated


def train_briefly(
    cfg: DictConfig, directory: Path, overrides: Sequence[str], *, interrupt_at: int | None = None
) -> Steps:
    """step -> logged train metrics of a short run of `cfg` with `overrides`, trained as the real run would be:
    by `run_stage` in this process, or as its own `thinkforge-train` process for multi-process strategies (they
    relaunch their ranks from the command line). `interrupt_at` stops it before that step, as a kill would."""
    run_cfg = with_values(cfg, directory, overrides)
    if interrupt_at is not None:
        with open_dict(run_cfg):
            run_cfg.callbacks = {
                **(run_cfg.callbacks or {}),
                "doctor_interrupt": {"_target_": f"{__name__}.InterruptAt", "step": interrupt_at},
            }
    if validate(run_cfg).hardware.strategy == "fsdp":
        result = subprocess.run(own_process_command(run_cfg, directory), capture_output=True, text=True)
        if result.returncode != 0 and interrupt_at is None:
            lines = result.stderr.strip().splitlines()
            raise RuntimeError(f"{directory.name}: {lines[-1] if lines else 'failed'}")
    else:
        try:
            run_stage(run_cfg)
        except SimulatedKill:
            if interrupt_at is None:
                raise
    return read_steps(directory)


def first_step(cfg: DictConfig, directory: Path, *overrides: str) -> dict[str, float]:
    """train/loss and train/grad_norm of one step of `cfg` with `overrides`."""
    row = train_briefly(cfg, directory, [*overrides, "trainer.max_steps=1"])[0]
    return {"loss": row["train/loss"], "grad_norm": row["train/grad_norm"]}


def relative_gap(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)


def read_steps(directory: Path) -> Steps:
    """step -> every metric logged at that step, for the steps that trained (they log train/loss)."""
    steps: Steps = {}
    for name, points in read_csv_log(directory).items():
        for step, value in points:
            steps.setdefault(step, {})[name] = value
    return {step: metrics for step, metrics in steps.items() if "train/loss" in metrics}


def disk_usage(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) if directory.exists() else 0


def prune_runs(workdir: Path) -> None:
    """Deletes the short runs' checkpoints and exports (a 135M model leaves 2 GB per run); their logs stay."""
    for pattern in ("*/checkpoints", "*/export", "*/rollout_model", "*/hpc_ckpt_*.ckpt"):
        for path in workdir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
