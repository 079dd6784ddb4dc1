"""The demo pipeline on several seeds, and whether its RL holds what it learns: one table row per seed.

    python scripts/demo_seeds.py --seeds 0 1 2                      # thinkforge-pipeline seed=N for each N
    python scripts/demo_seeds.py --seeds 0 1 2 -- stages.grpo.optim.lr=5e-5   # with overrides for every seed

Each seed's run directory is the pipeline's own (logs/pipeline/demo-seed<N>), so a seed already run is read back,
and changing only GRPO's settings reruns only GRPO. Columns: greedy pass@1 after each stage; GRPO's reward peak
(the highest mean over 10 consecutive steps), the mean over its last 10 steps and their ratio (holds: >= 95%); the
best held-out point during GRPO and the final cell, and whether the final is within 2 points of the best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from thinkforge.csv_log import read_csv_log

STAGES = ("midtrain", "sft", "dpo", "grpo")
WINDOW = 10


def reward_hold(run_dir: Path) -> tuple[float, float]:
    """(the highest mean reward over 10 consecutive steps, the mean over the last 10)."""
    rewards = [value for _, value in read_csv_log(run_dir).get("train/reward/mean", [])]
    means = [sum(rewards[i : i + WINDOW]) / WINDOW for i in range(len(rewards) - WINDOW + 1)]
    return max(means), means[-1]


def heldout_points(run_dir: Path) -> dict[int, float]:
    return dict(read_csv_log(run_dir).get("heldout/accuracy", []))


def row(seed: int, root: Path) -> str:
    cells = []
    for stage in STAGES:
        scores = json.loads((root / stage / "heldout.json").read_text())
        cells.append(f"{scores['accuracy']:.1%}")
    grpo = root / "grpo"
    peak, last = reward_hold(grpo)
    points = heldout_points(grpo)
    best_step, best = max(points.items(), key=lambda item: item[1])
    final = points[max(points)]
    return (
        f"| {seed} | " + " | ".join(cells) + f" | {peak:.3f} | {last:.3f} | {last / peak:.1%} "
        f"| {best:.1%} (step {best_step}) | {final:.1%} | {'yes' if best - final <= 0.02 else 'no'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="thinkforge-pipeline overrides for every seed (after --)")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        command = ["thinkforge-pipeline", f"seed={seed}", *args.overrides]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            sys.exit(f"seed {seed} failed")
        rows.append(row(seed, Path("logs/pipeline") / f"demo-seed{seed}"))
    print(
        "| seed | midtrain | sft | dpo | grpo | GRPO reward peak (10-step mean) | last 10 steps | last / peak "
        "| best held-out point | final | final within 2 points |"
    )
    print("|---" * 11 + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
