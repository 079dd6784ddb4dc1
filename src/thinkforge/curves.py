"""Pictures of a run: `curves.png` from the CSV log of one stage, and one for a whole pipeline.

A stage's picture has a panel for each of its headline metrics that the log holds (loss for the language-model
stages; margins and chosen log-probs for DPO; reward, accuracy, length, entropy and KL for GRPO), and the held-out
scores at each point of the stage when it was scored during training. A pipeline's picture puts held-out accuracy
after each stage first, then the RL stages' panels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thinkforge.csv_log import read_csv_log

# (metric in the CSV log, panel title); a panel is drawn when the log has the metric
LOSS_PANELS: tuple[tuple[str, str], ...] = (("train/loss", "training loss"), ("val/loss", "validation loss"))
RL_PANELS: tuple[tuple[str, str], ...] = (
    ("train/reward/mean", "GRPO reward (first sampling round)"),
    ("train/reward/accuracy", "GRPO sampled accuracy"),
    ("train/completion/mean_length", "GRPO completion length (tokens)"),
    ("train/entropy", "GRPO entropy"),
    ("train/kl", "GRPO KL to the start"),
    ("train/rewards/margins", "DPO reward margin"),
    ("train/rewards/accuracies", "DPO implicit-reward accuracy"),
    ("train/logps/chosen", "DPO chosen log-prob"),
    ("val/rewards/accuracies", "DPO held-out implicit-reward accuracy"),
)
SMOOTHING_WINDOW = 5
HELDOUT_TITLE = "held-out greedy pass@1 (%)"


def _smoothed(values: Sequence[float]) -> list[float]:
    """A trailing mean over a few steps: RL metrics are noisy from step to step."""
    windows = [values[max(0, i - SMOOTHING_WINDOW + 1) : i + 1] for i in range(len(values))]
    return [sum(window) / len(window) for window in windows]


def _plot_series(axis: Any, points: list[tuple[int, float]], title: str, label: str | None = None) -> None:
    steps, values = zip(*points)
    line = axis.plot(steps, values, alpha=0.3, linewidth=1)[0]
    axis.plot(steps, _smoothed(values), color=line.get_color(), linewidth=2, label=label)
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("step", fontsize=8)
    axis.grid(alpha=0.3)


def heldout_points(series: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Greedy pass@1 at the start (when scored) and at every held-out point; [] unless there are two or more."""
    points = series.get("heldout_start/accuracy", [])[:1] + series.get("heldout/accuracy", [])
    return points if len(points) >= 2 else []


def _plot_points(axis: Any, points: list[tuple[int, float]], title: str) -> None:
    """Held-out points as measured (a few, not noisy per step: no smoothing), as percentages."""
    steps, values = zip(*points)
    axis.plot(steps, [100 * value for value in values], marker="o", linewidth=2)
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("step", fontsize=8)
    axis.grid(alpha=0.3)


def _figure(num_panels: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, num_panels)
    rows = -(-num_panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    flat = [axis for row in axes for axis in row]
    for axis in flat[num_panels:]:
        axis.set_visible(False)
    return figure, flat[:num_panels]


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def stage_curves(run_dir: Path, title: str = "") -> Path | None:
    """`run_dir/curves.png` with the stage's headline metrics; None when its log holds none of them."""
    series = read_csv_log(run_dir)
    panels = [(name, panel_title) for name, panel_title in LOSS_PANELS + RL_PANELS if series.get(name)]
    heldout = heldout_points(series)
    if not panels and not heldout:
        return None
    figure, axes = _figure(len(panels) + bool(heldout))
    for axis, (name, panel_title) in zip(axes, panels):
        _plot_series(axis, series[name], panel_title)
    if heldout:
        _plot_points(axes[-1], heldout, HELDOUT_TITLE)
    if title:
        figure.suptitle(title)
    return _save(figure, run_dir / "curves.png")


def pipeline_curves(records: Sequence[dict[str, Any]], stage_dirs: Sequence[Path], path: Path, title: str = "") -> Path:
    """Held-out accuracy after each stage (greedy pass@1, and sampled pass@1 / pass@k when measured), then the
    RL stages' training curves."""
    logs = {record["stage"]: read_csv_log(directory) for record, directory in zip(records, stage_dirs)}
    rl_panels = [(stage, name, title) for stage, log_ in logs.items() for name, title in RL_PANELS if log_.get(name)]
    during = [(stage, points) for stage, log_ in logs.items() if (points := heldout_points(log_))]
    figure, axes = _figure(1 + len(rl_panels) + len(during))
    stages = [record["stage"] for record in records]
    heldout = [record.get("heldout") or {} for record in records]
    summary = axes[0]
    for name, label in [("accuracy", "greedy pass@1"), ("sampled_accuracy", "sampled pass@1")] + [
        (name, name) for name in sorted({n for h in heldout for n in h if n.startswith("pass@")})
    ]:
        if any(name in h for h in heldout):
            summary.plot(stages, [100 * h.get(name, float("nan")) for h in heldout], marker="o", label=label)
    summary.set_title("held-out accuracy after each stage (%)", fontsize=10)
    summary.set_ylim(0, 100)
    summary.grid(alpha=0.3)
    summary.legend(fontsize=8)
    for axis, (stage, name, panel_title) in zip(axes[1:], rl_panels):
        _plot_series(axis, logs[stage][name], f"{stage}: {panel_title}")
    for axis, (stage, points) in zip(axes[1 + len(rl_panels) :], during):
        _plot_points(axis, points, f"{stage}: {HELDOUT_TITLE}")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
