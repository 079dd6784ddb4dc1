"""The bookkeeping of one optimizer step: its metrics summed over micro-batches and ranks, and its finiteness."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from thinkforge.collectives import Collectives
from thinkforge.errors import UserError
from thinkforge.losses import is_extreme


class NonFiniteStep(UserError):
    """A training step whose loss or gradient norm is not finite."""


class StepSums:
    """A step's loss-sum metrics, token and slot counts over its micro-batches: sums, except `…/min` and `…/max`
    metrics, which keep their extreme."""

    def __init__(self) -> None:
        self.sums: defaultdict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        for name, tensor in metrics.items():
            value = float(tensor.detach())
            if is_extreme(name):
                self.extremes[name] = (min if name.endswith("/min") else max)(self.extremes.get(name, value), value)
            else:
                self.sums[name] += value
        self.sums["tokens"] += float(batch["num_tokens"])
        self.sums["slots"] += float(batch["num_slots"])

    def metrics(
        self, collectives: Collectives, loss: float, units: float, grad_norm: float, lr: float, seconds: float
    ) -> dict[str, float]:
        """Per-unit means over the global batch, throughput, fill, and the extremes over ranks."""
        totals = collectives.sums({**self.sums, "loss": loss})
        metrics = {name: value / max(units, 1.0) for name, value in totals.items() if name not in ("tokens", "slots")}
        metrics.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=totals["tokens"] / max(seconds, 1e-9),
            step_s=seconds,
            fill_ratio=totals["tokens"] / max(totals["slots"], 1.0),
        )
        return {**metrics, **collectives.extremes(self.extremes)}

    def means(self, collectives: Collectives, prefix: str) -> dict[str, float]:
        """Validation's per-unit means over every rank (the sums carry their `units`); {} when there were none."""
        totals = collectives.sums({"units": 0.0, **self.sums})
        if totals["units"] == 0:
            return {}
        return {prefix + k: v / totals["units"] for k, v in totals.items() if k not in ("units", "tokens", "slots")}


def stop_unless_finite(collectives: Collectives, step: int, loss: float, grad_norm: float, output_dir: str) -> None:
    """A NaN or infinite loss or gradient norm on any rank stops every rank before the optimizer step would write it
    into the weights, so every checkpoint already saved holds finite weights."""
    if collectives.sum(float(not torch.isfinite(torch.tensor([loss, grad_norm])).all())).item() == 0:
        return
    raise NonFiniteStep(
        f"step {step}: the loss is {loss:g} and the gradient norm {grad_norm:g} (this rank's); stopped before this "
        f"step's optimizer update, so the checkpoints in {Path(output_dir) / 'checkpoints'} are intact. Lower optim.lr "
        "or check the data; re-running the command resumes from the last one"
    )
