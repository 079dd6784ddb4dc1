"""Weights & Biases and MLflow, each beside the CSV log that curves, sweeps and the doctor read (`logger=wandb`,
`logger=mlflow`). A run directory is one tracked run: re-running the command into it (a resume) continues that
run rather than starting a second one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

#: where the MLflow run of a run directory is remembered, so a resumed run logs into it
MLFLOW_RUN_ID = "mlflow_run_id"


def run_name(directory: Path) -> str:
    """The run directory below `logs/` (sft/runs/2026-12-06_10-00-00, pipeline/demo-seed0/grpo), else its name."""
    parts = directory.resolve().parts
    return "/".join(parts[parts.index("logs") + 1 :]) if "logs" in parts[:-1] else directory.name


def sweep_group() -> str | None:
    """A multirun's jobs share one group: the sweep directory's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def wandb_logger(save_dir: str, project: str = "thinkforge", entity: str | None = None, **options: Any) -> WandbLogger:
    """W&B's run id derives from the run directory, so a resume continues the run (`WANDB_MODE=offline` writes it
    under `<run dir>/wandb` without a network)."""
    directory = Path(save_dir).resolve()
    run_id = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    options.setdefault("group", sweep_group())
    return WandbLogger(
        name=run_name(directory),
        save_dir=str(directory),
        project=project,
        entity=entity,
        id=run_id,
        resume="allow",
        **options,
    )


def mlflow_logger(
    save_dir: str, experiment_name: str = "thinkforge", tracking_uri: str | None = None, **options: Any
) -> MLFlowLogger:
    """MLflow's run is created on the first start and its id kept in the run directory; a resume logs into it.
    `tracking_uri` null: a file store, `logs/mlruns` in the working directory, shared by every run."""
    directory = Path(save_dir)
    remembered = directory / MLFLOW_RUN_ID
    if tracking_uri is None:
        # MLflow 3 keeps its file store working but refuses it unless asked; a database store needs the full
        # mlflow package (tracking_uri=sqlite:///mlflow.db)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking_uri = (Path("logs") / "mlruns").resolve().as_uri()
    logger = MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name(directory),
        tracking_uri=tracking_uri,
        run_id=remembered.read_text().strip() if remembered.exists() else None,
        **options,
    )
    if getattr(rank_zero_only, "rank", 0) == 0 and not remembered.exists():  # only rank 0 creates the run
        directory.mkdir(parents=True, exist_ok=True)
        remembered.write_text(str(logger.run_id))
    return logger


def log_samples(logger: Any, key: str, samples: list[dict[str, Any]], *, step: int) -> None:
    """Samples as a table, where the logger keeps tables (W&B: one table per held-out point, under `key`); the
    others have the samples in the run directory's `*_samples.jsonl`."""
    if isinstance(logger, WandbLogger):
        columns = list(samples[0])
        logger.log_table(
            key, columns=columns, data=[[sample[name] for name in columns] for sample in samples], step=step
        )
