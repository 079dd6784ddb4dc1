"""The few collectives the stages need, over the data-parallel ranks; in one process each is the identity.

Every function is called by all ranks together, in the same order: a rank that skips one leaves the others
waiting in it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """Sums, extremes and gathers across `world_size` ranks, on `device` (gloo on CPU, NCCL on GPU), over `group`
    (None: the default one; a thread of its own needs a group of its own, or its calls interleave with the
    trainer's)."""

    def __init__(
        self, rank: int, world_size: int, device: torch.device, group: dist.ProcessGroup | None = None
    ) -> None:
        self.rank, self.world_size, self.device, self.group = rank, world_size, device, group

    def sum(self, value: torch.Tensor | float | list[float]) -> torch.Tensor:
        """The float64 sum over ranks of a number or a vector of them."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sums(self, values: dict[str, float]) -> dict[str, float]:
        """Each named number summed over ranks, in one collective."""
        names = sorted(values)
        return dict(zip(names, self.sum([values[name] for name in names]).tolist()))

    def extremes(self, values: dict[str, float]) -> dict[str, float]:
        """Each `…/min` metric's minimum and each `…/max` metric's maximum over ranks."""
        combined = {}
        for name in sorted(values):
            value = torch.tensor(values[name], dtype=torch.float64, device=self.device)
            if self.world_size > 1:
                dist.all_reduce(
                    value, op=dist.ReduceOp.MIN if name.endswith("/min") else dist.ReduceOp.MAX, group=self.group
                )
            combined[name] = value.item()
        return combined

    def std(self, values: torch.Tensor) -> float:
        """The unbiased std of `values` over all ranks together."""
        total, squares, count = self.sum(
            [values.sum().item(), (values**2).sum().item(), float(values.numel())]
        ).tolist()
        return float(max(0.0, (squares - total**2 / count) / max(count - 1, 1)) ** 0.5)

    def concat(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values`, of any length, concatenated in rank order on every rank."""
        if self.world_size == 1:
            return values
        local = values.to(self.device)
        lengths = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([local.numel()], device=self.device), group=self.group)
        longest = max(int(length.item()) for length in lengths)
        padded = torch.zeros(longest, dtype=local.dtype, device=self.device)
        padded[: local.numel()] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part[: int(length.item())] for part, length in zip(gathered, lengths)])

    def share(self, count: int) -> list[int]:
        """This rank's share of `count` items: every world_size-th, trimmed so all ranks get as many (each rank
        must make the same number of sharded generate calls)."""
        return list(range(self.rank, count - count % self.world_size, self.world_size))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered
