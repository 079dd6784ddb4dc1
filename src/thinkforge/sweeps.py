"""What a `-m` sweep ends with: one table row per job, its overrides beside its final metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from thinkforge.csv_log import read_csv_log


def job_row(job: Path) -> dict[str, str]:
    """A finished (or failed) job's overrides (its folder's name), last logged step and loss, held-out accuracy."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    row = {"overrides": " ".join(overrides), "step": "-", "train/loss": "-", "held-out accuracy": "-"}
    losses = read_csv_log(job).get("train/loss")
    if losses:
        row["step"], row["train/loss"] = str(losses[-1][0]), f"{losses[-1][1]:.4f}"
    heldout = job / "heldout.json"
    if heldout.exists():
        row["held-out accuracy"] = f"{json.loads(heldout.read_text())['accuracy']:.1%}"
    return row


def sweep_table(sweep_dir: Path) -> str:
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").exists()), key=lambda p: p.stat().st_mtime
    )
    rows = [job_row(job) for job in jobs]
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(row[column] for column in columns) + " |" for row in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback (conf/train.yaml): after every job of a sweep, print the table and write sweep_summary.md."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir) if sweep_dir.is_dir() else ""
        if table:
            (sweep_dir / "sweep_summary.md").write_text(f"# sweep {sweep_dir}\n\n{table}\n")
            print(f"\n[sweep] {sweep_dir}/sweep_summary.md\n{table}", flush=True)
