"""Rollouts sampled ahead of the trainer (`stage.max_staleness`): the rollouts a step trains on may come from weights
up to `max_staleness` optimizer steps older than the ones they update.

With k = max_staleness, the step at data position p trains on the rollouts of position p and, before it, samples
those of every position up to p + k not sampled yet, with its current weights. So position p's rollouts were sampled
at position p - k (the first k positions: at position 0), with the seed of position p, whenever they were sampled:
k = 0 is exactly the on-policy trainer. A rollout carries the optimizer step that sampled it (`policy_version`); the
loss corrects for the gap with the sampler's log-probs it stored (`stage.rollout_correction`).

In the background (`start_in_background`, for an engine that does not run in the trainer's process), the last
position ahead is sampled while the trainer trains: its engine is readied with the current weights first, and the
next step waits for that sampling to finish before it pushes new weights, so no generation is in flight when the
weights change, and the rollouts are those the same run would sample without the overlap.

The rollouts sampled ahead cannot be sampled again after a restart (their weights are gone), so a checkpoint saves
them (after waiting for one in the background): each rank writes its own beside the checkpoint,
`rollouts_ahead/step<step>_rank<rank>.pt`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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

    def __init__(
        self,
        max_staleness: int,
        sample: Callable[[int], SampledBatch],
        *,
        start_in_background: Callable[[], Callable[[int], SampledBatch]] | None = None,
        final_position: int | None = None,
    ) -> None:
        """`sample(position)` samples and scores the groups of a data position with the current weights.
        `start_in_background()`, called in the trainer's thread, readies the engine with the current weights and
        returns the `sample` to run in a background thread; None samples every position in the caller's thread.
        Positions after `final_position` (the run's last) are never sampled."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0; got {max_staleness}")
        if start_in_background is not None and max_staleness < 1:
            raise ValueError("sampling in the background needs max_staleness >= 1")
        self.max_staleness, self.sample, self.start_in_background = max_staleness, sample, start_in_background
        self.final_position = final_position
        self.batches: dict[int, SampledBatch] = {}
        self.pending: tuple[int, Future[SampledBatch]] | None = None
        self.executor = ThreadPoolExecutor(max_workers=1) if start_in_background else None

    def take(self, position: int) -> tuple[SampledBatch, float]:
        """Position `position`'s batch, after sampling every later one up to `position + max_staleness` that is
        missing (the last of them in the background, where it may); and the seconds this call kept the trainer
        waiting. The batch stays held until `done(position)`: a run stopped inside the step saves it."""
        started = time.perf_counter()
        self.settle()
        last = position + self.max_staleness
        if self.final_position is not None:
            last = min(last, max(position, self.final_position))
        # the run's last position has nothing after it to overlap with: it is sampled here
        background = self.executor is not None and self.start_in_background is not None and last > position
        for ahead in range(position, last if background else last + 1):
            if ahead not in self.batches:
                self.batches[ahead] = self.sample(ahead)
        if background and last not in self.batches:
            assert self.executor is not None and self.start_in_background is not None
            sample = self.start_in_background()
            self.pending = (last, self.executor.submit(sample, last))
        return self.batches[position], time.perf_counter() - started

    def settle(self) -> None:
        """Waits for the sampling in the background, if one runs (before anything else uses the engine or its
        weights change); its error, if it failed, is raised here."""
        if self.pending is None:
            return
        position, future = self.pending
        self.pending = None
        self.batches[position] = future.result()

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
        self.settle()
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
