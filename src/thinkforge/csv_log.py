"""Reading a run's CSV log (written by `thinkforge.resume.ContinuingCSVLogger`): curves, the doctor, sweep tables.

Plain `csv`, no Lightning: the sweep summary runs as a Hydra callback of every command, even a dry run.
"""

from __future__ import annotations

import csv
from pathlib import Path


def read_csv_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from `run_dir/csv/metrics.csv`; empty when the run logged no CSV."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series
