"""Rollouts sampled ahead of the trainer (`stage.max_staleness`): the rollouts a step trains on may come from weights
up to `max_staleness` optimizer steps older than the ones they update.

With k = max_staleness, the step at data position p trains on the rollouts of position p and, before it, samples
those of every position up to p + k not sampled yet, with its current weights. So position p's rollouts were sampled
at position p - k (the first k positions: at position 0), with the seed of position p, whenever they were sampled:
k = 0 is exactly the on-policy trainer. A rollout carries the optimizer step that sampled it (`policy_version`); the
loss corrects for the gap with the sampler's log-probs it stored (`stage.rollout_correction`).

The rollouts sampled ahead cannot be sampled again after a restart (their weights are gone), so a checkpoint saves
them: each rank writes its own beside the checkpoint, `rollouts_ahead/step<step>_rank<rank>.pt`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.rollout.groups import Group
from thinkforge.rollout.settings import SamplingParams

log = logging.getLogger(__name__)

#: checkpoints whose rollouts each rank keeps on disk (the newest checkpoint may be half written when a run dies)
KEPT_SAVES = 2


@dataclass
class SampledBatch:
    """One data position's scored groups, as sampled, with the step's rollout statistics."""

    position: int
    groups: list[Group]
    stats: dict[str, float]
    sampling: SamplingParams
    #: seconds spent sampling and scoring them
    seconds: float


class RolloutsAhead:
    """The sampled batches of the positions after the trainer's, up to `max_staleness` of them."""

    def __init__(self, max_staleness: int, sample: Callable[[int], SampledBatch]) -> None:
        """`sample(position)` samples and scores the groups of a data position with the current weights."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0; got {max_staleness}")
        self.max_staleness, self.sample = max_staleness, sample
        self.batches: dict[int, SampledBatch] = {}

    def take(self, position: int) -> tuple[SampledBatch, float]:
        """Position `position`'s batch, after sampling every later one up to `position + max_staleness` that is
        missing; and the seconds this call spent sampling. The batch stays held until `done(position)`: a run
        stopped inside the step saves it with the others."""
        seconds = 0.0
        for ahead in range(position, position + self.max_staleness + 1):
            if ahead not in self.batches:
                self.batches[ahead] = self.sample(ahead)
                seconds += self.batches[ahead].seconds
        return self.batches[position], seconds

    def done(self, position: int) -> None:
        """The step of `position` is trained: its batch (and any earlier one) is dropped."""
        self.batches = {held: batch for held, batch in self.batches.items() if held > position}

    # ---- resume -----------------------------------------------------------------------------------------------
    @staticmethod
    def path(directory: Path, step: int, rank: int) -> Path:
        return directory / f"step{step}_rank{rank}.pt"

    def save(self, directory: Path, step: int, rank: int) -> None:
        """This rank's held batches, for the checkpoint of optimizer step `step`; older saves beyond the newest
        `KEPT_SAVES` are removed."""
        if self.max_staleness == 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        target = self.path(directory, step, rank)
        partial = target.with_suffix(".partial")
        torch.save(list(self.batches.values()), partial)
        partial.replace(target)
        saves = sorted(directory.glob(f"step*_rank{rank}.pt"), key=lambda path: int(path.name[4:].split("_")[0]))
        for old in saves[:-KEPT_SAVES]:
            old.unlink()

    def load(self, directory: Path, step: int, rank: int) -> None:
        """The batches a checkpoint of step `step` held; without them the resumed run could not train on the same
        rollouts, so their absence stops it."""
        if self.max_staleness == 0:
            return
        source = self.path(directory, step, rank)
        if not source.exists():
            raise FileNotFoundError(
                f"{source} is missing: the rollouts sampled ahead of step {step} (stage.max_staleness="
                f"{self.max_staleness}) were saved with its checkpoint and cannot be sampled again from weights that "
                "are gone; resume from a checkpoint whose rollouts are there (the two newest are kept)"
            )
        # our own file in the run directory, holding dataclasses: not a weights-only checkpoint
        batches: list[SampledBatch] = torch.load(source, weights_only=False)
        self.batches = {batch.position: batch for batch in batches}
        log.info("%d batches of rollouts sampled ahead read back from %s", len(batches), source)
