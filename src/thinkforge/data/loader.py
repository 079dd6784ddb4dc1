"""Step-indexed batches shared by every stage.

Global batch `k` is a fixed function of (seed, k): positions [k·B, (k+1)·B) of an endless stream of seeded epoch
permutations. The data position therefore *is* the optimizer step: a run resumed at step k continues with exactly
the batches the interrupted run would have seen, and N data-parallel ranks together see the same global batch as
one process does (rank r takes the r-th slice). Each rank's share arrives as a list of collated micro-batches so
the stage can accumulate gradients over them inside one optimizer step.

With item lengths given (`data.group_by_length`), the global batch is sorted by length and cut into micro-batches
of neighbours, dealt to the ranks in turn: each step still trains on the same items, with less padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

Batch = dict[str, torch.Tensor]
#: what a collate function makes of a micro-batch's items (a tensor batch; GRPO's refills keep its prompts as a list)
MicroBatchT = TypeVar("MicroBatchT")
Collate = Callable[[Sequence[Any]], MicroBatchT]

log = logging.getLogger(__name__)


class StepBatches(IterableDataset[list[MicroBatchT]]):
    def __init__(
        self,
        items: Sequence[Any],
        *,
        batch_size: int,
        micro_batch_size: int,
        collate: Collate[MicroBatchT],
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if batch_size % (world_size * micro_batch_size):
            raise ValueError(
                f"batch size {batch_size} must split evenly into {world_size} ranks x micro batches of "
                f"{micro_batch_size}"
            )
        self.items, self.collate = items, collate
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        self.lengths = lengths
        self._permutation = lru_cache(maxsize=2)(self._epoch_permutation)

    def _epoch_permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    def global_indices(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._permutation(position // len(self.items))[position % len(self.items)] for position in positions]

    def rank_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's item indices of global batch `step`, micro-batch by micro-batch."""
        indices = self.global_indices(step)
        size = self.micro_batch_size
        if self.lengths is None:
            share = self.batch_size // self.world_size
            mine = indices[self.rank * share : (self.rank + 1) * share]
            return [mine[i : i + size] for i in range(0, share, size)]
        lengths = self.lengths
        indices = sorted(indices, key=lambda index: -lengths[index])
        micro_batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        return micro_batches[self.rank :: self.world_size]

    def rank_batch(self, step: int) -> list[MicroBatchT]:
        return [self.collate([self.items[index] for index in micro]) for micro in self.rank_micro_batches(step)]

    def __iter__(self) -> Iterator[list[MicroBatchT]]:
        step = self.start_step
        while True:
            yield self.rank_batch(step)
            step += 1


class EvalBatches(IterableDataset[list[Batch]]):
    """Each rank takes every world_size-th item, trimmed so all ranks run the same number of batches."""

    def __init__(
        self, items: Sequence[Any], *, micro_batch_size: int, collate: Collate[Batch], rank: int, world_size: int
    ) -> None:
        usable = len(items) - len(items) % world_size
        self.items = list(items[rank:usable:world_size])
        self.micro_batch_size, self.collate = micro_batch_size, collate

    def __iter__(self) -> Iterator[list[Batch]]:
        for start in range(0, len(self.items), self.micro_batch_size):
            yield [self.collate(self.items[start : start + self.micro_batch_size])]


class StageDataModule(L.LightningDataModule):
    """A stage's items on every rank, served step-indexed. Built in `setup`, so bad data stops the run before
    the model loads, unless `defer`: items sampled from the model itself (rollout DPO pairs) are built at their
    first use, once the model sits sharded on its device."""

    def __init__(
        self,
        build_items: Callable[[str], Sequence[Any]],
        collate: Collate[Batch],
        *,
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        has_val: bool,
        start_step: Callable[[], int],
        defer: bool = False,
        item_length: Callable[[Any], int] | None = None,
    ) -> None:
        """`start_step`: the loader batch to start from, asked when training starts (after a checkpoint is
        restored); `item_length`: group each step's micro-batches by this length (None: in data order)."""
        super().__init__()
        self.start_step = start_step
        self.build_items, self.collate, self.item_length = build_items, collate, item_length
        self.batch_size, self.micro_batch_size, self.seed, self.has_val = batch_size, micro_batch_size, seed, has_val
        self.defer = defer
        self._items: dict[str, Sequence[Any]] = {}

    def items(self, split: str) -> Sequence[Any]:
        if split not in self._items:
            self._items[split] = self.build_items(split) if split == "train" or self.has_val else ()
        return self._items[split]

    @property
    def train_items(self) -> Sequence[Any]:
        return self.items("train")

    @property
    def val_items(self) -> Sequence[Any]:
        return self.items("val")

    def setup(self, stage: str) -> None:
        if not self.defer:
            self.items("train")
            self.items("val")

    def ranks(self) -> tuple[int, int]:
        """This process's rank and the world size, from the trainer the datamodule is attached to."""
        if self.trainer is None:
            raise RuntimeError("the datamodule builds loaders only once a Trainer holds it")
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader[list[Any]]:
        rank, _ = self.ranks()
        if rank == 0 and len(self.train_items) < self.batch_size:
            log.warning(
                "data.batch_size=%d is more than the %d training items: every step sees each item %.1f times "
                "(lower data.batch_size, or add data)",
                self.batch_size,
                len(self.train_items),
                self.batch_size / max(len(self.train_items), 1),
            )
        return DataLoader(self.step_batches(self.start_step()), batch_size=None)

    def step_batches(self, start_step: int = 0) -> StepBatches[Batch]:
        """This rank's training batches by step, from `start_step` on; any step's batch can be asked for (GRPO
        samples rollouts of later steps ahead of the trainer)."""
        rank, world_size = self.ranks()
        return StepBatches(
            self.train_items,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            collate=self.collate,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            lengths=None if self.item_length is None else [self.item_length(item) for item in self.train_items],
        )

    def val_dataloader(self) -> DataLoader[list[Any]] | list[Any]:
        if not self.val_items:
            return []
        rank, world_size = self.ranks()
        batches = EvalBatches(
            self.val_items,
            micro_batch_size=self.micro_batch_size,
            collate=self.collate,
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(batches, batch_size=None)
