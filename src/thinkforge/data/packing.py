"""Sequences, best-fit-decreasing packing, and the collator that turns rows into model inputs.

A `TokenSequence` carries its input ids and *aligned* labels: `labels[i]` is the target predicted at position i
(the next token, or -100 where no loss is taken). Aligning labels before packing means no loss can ever reach
across a document boundary, and position ids that restart at 0 for each document keep attention inside it.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenSequence:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @classmethod
    def causal(cls, token_ids: Sequence[int], loss_mask: Sequence[bool] | None = None) -> "TokenSequence":
        """Next-token labels; `loss_mask[j]` says whether token j is a target (e.g. assistant tokens only)."""
        ids = tuple(token_ids)
        labels = [
            ids[i + 1] if loss_mask is None or loss_mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)
        ]
        return cls(ids, tuple(labels) + (IGNORE_INDEX,))


def fit_to_length(sequences: Sequence[TokenSequence], max_length: int, overflow: str) -> tuple[list[TokenSequence], Counter[str]]:
    """Splits, truncates or drops sequences longer than max_length; counts what happened to them."""
    kept: list[TokenSequence] = []
    counts: Counter[str] = Counter()
    for sequence in sequences:
        if len(sequence) <= max_length:
            kept.append(sequence)
            continue
        counts[{"split": "split", "truncate": "truncated", "drop": "dropped"}[overflow]] += 1
        if overflow == "drop":
            continue
        starts = range(0, len(sequence), max_length) if overflow == "split" else (0,)
        for start in starts:
            piece = TokenSequence(sequence.input_ids[start : start + max_length], sequence.labels[start : start + max_length])
            if piece.num_targets > 0:
                kept.append(piece)
    return kept, counts


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices: longest first, each into the fullest bin that still has room."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sequence {index} has {length} tokens, more than the row capacity {capacity}")
        position = bisect.bisect_left(free, (length, -1))
        if position == len(free):
            bins.append([index])
            remaining, slot = capacity - length, len(bins) - 1
        else:
            remaining, slot = free.pop(position)
            bins[slot].append(index)
            remaining -= length
        if remaining > 0:
            bisect.insort(free, (remaining, slot))
    return bins


def pack(sequences: Sequence[TokenSequence], max_length: int) -> list[list[TokenSequence]]:
    bins = best_fit_decreasing([len(s) for s in sequences], max_length)
    return [[sequences[index] for index in indices] for indices in bins]


def fill_ratio(rows: Sequence[Sequence[TokenSequence]], max_length: int) -> float:
    return sum(len(s) for row in rows for s in row) / max(1, len(rows) * max_length)


def collate_rows(
    rows: Sequence[Sequence[TokenSequence]], pad_id: int, *, row_length: int, flatten: bool
) -> dict[str, torch.Tensor]:
    """Rows of documents -> input_ids / position_ids / labels.

    `flatten=False`: one tensor row per packed row, padded to the longest (SDPA derives a block-diagonal mask from
    position ids; a flattened batch would make its mask quadratic in the whole batch). `flatten=True`: every
    document of every row concatenated into a single padding-free row (flash-attn varlen).
    `num_slots` counts the row capacity the documents were packed into, so tokens/slots is the fill ratio.
    """
    num_slots = len(rows) * row_length
    if flatten:
        rows = [[document for row in rows for document in row]]
    width = max(sum(len(document) for document in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real_tokens = 0
    for row_index, row in enumerate(rows):
        cursor = 0
        for document in row:
            end = cursor + len(document)
            input_ids[row_index, cursor:end] = torch.tensor(document.input_ids)
            labels[row_index, cursor:end] = torch.tensor(document.labels)
            position_ids[row_index, cursor:end] = torch.arange(len(document))
            cursor = end
        real_tokens += cursor
        position_ids[row_index, cursor:] = torch.arange(width - cursor)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "num_tokens": torch.tensor(real_tokens),
        "num_slots": torch.tensor(num_slots),
    }
