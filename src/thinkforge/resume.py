"""Everything a resumed stage depends on, in one module.

A stage resumes when its run directory holds a checkpoint (`ckpt_path=last`, the default): a requeued SLURM job, a
re-run of the same command, a pipeline picking up an interrupted stage. What makes the resumed run the same run:

- which checkpoint: `resume_checkpoint` (SLURM's hpc_ckpt_<n>.ckpt or the rolling checkpoints/last.ckpt);
- the model, optimizer, schedule and step: Lightning's own checkpoint contents;
- the stage's own state Lightning does not save: `ResumeState` (held-out start scores, GRPO's count of steps
  without signal);
- the data position: `data_position`, derived from the step, so no loader state is saved;
- rows sampled once from the starting checkpoint (rollout DPO's pairs, rejection-sampled SFT's replies): read
  back from the run directory (`read_sampled_rows`/`write_sampled_rows`), never sampled again from trained weights;
- the metrics log: `ContinuingCSVLogger` keeps the earlier process's rows before the resumed step.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from thinkforge.config import TrainConfig

log = logging.getLogger(__name__)


def resume_checkpoint(run: TrainConfig) -> str | None:
    """`ckpt_path=last` (the default): this run directory's newest checkpoint if there is one; Lightning writes
    hpc_ckpt_<n>.ckpt when SLURM signals the end of the job, the rolling checkpoints/last.ckpt otherwise."""
    if run.ckpt_path != "last":
        return run.ckpt_path
    output = Path(run.output_dir)
    found = [path for path in [*output.glob("hpc_ckpt_*.ckpt"), output / "checkpoints" / "last.ckpt"] if path.exists()]
    if not found:
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(newest)


def data_position(global_step: int, steps_per_batch: int) -> int:
    """Loader batches fully used after `global_step` optimizer steps: one batch per step, or per
    `stage.num_iterations` steps for GRPO. The loader restarts from here and rollout seeds derive from it."""
    return global_step // steps_per_batch


class ResumeState(Callback):
    """The stage attributes a checkpoint carries beside Lightning's own state. `initial_heldout`: the starting
    checkpoint's held-out scores, measured once before the first step (a resumed run must not measure its resumed
    weights instead). `steps_without_signal`: GRPO's run of steps with no reward spread, so its stop rule counts
    across a resume. `heldout_history`: the held-out points measured so far, for the best of them and the
    summary. `collapse_watch`: GRPO's entropy-collapse watch (its start, peak and whether it warned)."""

    KEPT = ("initial_heldout", "steps_without_signal", "heldout_history", "collapse_watch")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["thinkforge"] = {
            name: value.state_dict() if hasattr(value, "state_dict") else value
            for name in self.KEPT
            if (value := getattr(pl_module, name, None)) is not None
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        for name, value in checkpoint.get("thinkforge", {}).items():
            if name not in self.KEPT or not hasattr(pl_module, name):
                continue
            if hasattr(getattr(pl_module, name), "load_state_dict"):  # an object keeps its state as plain values
                getattr(pl_module, name).load_state_dict(value)
            else:
                setattr(pl_module, name, value)


def sampled_rows_path(output_dir: str, kind: str, split: str) -> Path:
    """Where a run keeps the rows it sampled from its starting checkpoint: `rollout_pairs_train.jsonl`, ..."""
    return Path(output_dir) / f"{kind}_{split}.jsonl"


def read_sampled_rows(path: Path, global_step: int) -> list[dict[str, Any]] | None:
    """The rows an earlier process of this run sampled, or None when none were written yet. A resumed run
    (step > 0) without them stops: its weights are no longer the starting checkpoint's to sample from."""
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        log.info("%d sampled rows read back from %s", len(rows), path)
        return rows
    if global_step > 0:
        raise RuntimeError(
            f"{path} is missing: a resumed run cannot sample its rows from the starting checkpoint again"
        )
    return None


def write_sampled_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Whole or absent: a run killed while writing samples again on restart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    partial.replace(path)


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning deletes `metrics.csv` when a logger opens a directory that has one, so a run resumed from step k
    would keep only steps k..end. Here the file is kept: the first save of a process drops the rows at or after the
    first step it logs (the steps the resumed run does again, from its checkpoint), so every step is in the file
    exactly once."""

    def __init__(self, log_dir: str) -> None:
        self._continuing = True
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keeps an earlier process's metrics.csv (Lightning's own writer deletes it)."""

    def save(self) -> None:
        # the first save that has metrics (saving hyperparameters comes earlier and has none)
        if self._continuing and self.metrics:
            self._continuing = False
            if self._fs.isfile(self.metrics_file_path):
                self._keep_rows_before(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _keep_rows_before(self, first_step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            earlier = [row for row in csv.DictReader(handle) if int(row["step"]) < first_step]
        self.metrics_keys = sorted({key for row in earlier for key in row if row[key] != ""})
        with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(earlier)


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSV logger, continued across a resume instead of restarted."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        assert isinstance(self._experiment, ExperimentWriter)
        return self._experiment
