"""Lightning's CSV logger, continued across a resume instead of restarted.

Lightning deletes `metrics.csv` when a logger opens a directory that has one, so a run resumed from step k keeps
only steps k..end, and every curve drawn from it starts at the resume point. Here the file is kept: the first
save of a process drops the rows at or after the first step it logs (the steps the resumed run does again, from
its checkpoint), so every step is in the file exactly once.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuingExperimentWriter(ExperimentWriter):
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
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
