"""Sequences, best-fit-decreasing packing, and the collator that turns rows into model inputs.

A `TokenSequence` carries its input ids and *aligned* labels: `labels[i]` is the target predicted at position i
(the next token, or -100 where no loss is taken). Aligning labels before packing means no loss can ever reach
across a document boundary, and position ids that restart at 0 for each document keep attention inside it.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

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
    def causal(cls, token_ids: Sequence[int], loss_mask: Sequence[bool] | None = None) -> TokenSequence:
        """Next-token labels; `loss_mask[j]` says whether token j is a target (e.g. assistant tokens only)."""
        ids = tuple(token_ids)
        labels = [ids[i + 1] if loss_mask is None or loss_mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
        return cls(ids, (*labels, IGNORE_INDEX))


def fit_to_length(
    sequences: Sequence[TokenSequence], max_length: int, overflow: str
) -> tuple[list[TokenSequence], Counter[str]]:
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
            piece = TokenSequence(
                sequence.input_ids[start : start + max_length], sequence.labels[start : start + max_length]
            )
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


def padded_width(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def collate_rows(
    rows: Sequence[Sequence[TokenSequence]],
    pad_id: int,
    *,
    row_length: int | None,
    flatten: bool,
    pad_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Rows of documents -> input_ids / position_ids / labels.

    `flatten=False`: one tensor row per packed row, padded to the longest (SDPA derives a block-diagonal mask from
    position ids; a flattened batch would make its mask quadratic in the whole batch). `flatten=True`: every
    document of every row concatenated into a single padding-free row (flash-attn varlen).
    `row_length`: the capacity packed rows were filled to, which `num_slots` counts, so tokens/slots is the
    packing's fill ratio. None for unpacked rows: they are padded to the micro-batch's longest, rounded up to
    `pad_multiple` (kernel-friendly shapes), and `num_slots` counts those padded cells.
    """
    if flatten:
        rows = [[document for row in rows for document in row]]
    width = max(sum(len(document) for document in row) for row in rows)
    if row_length is None:
        width = padded_width(width, pad_multiple)
    num_slots = len(rows) * width if row_length is None or flatten else len(rows) * row_length
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


@dataclass(frozen=True)
class Document:
    """One attention span of scored completions: a prompt with one completion, or (prompt sharing) the prompt once
    followed by every completion as a branch that sees the prompt and itself only.

    A branch starts with the prompt's last token, whose label is the completion's first token, so each branch
    scores exactly what the prompt + completion sequence would. `branch_ids` is 0 on tokens every branch sees.
    `members` are the completions' indices in the caller's order; `spans` their label positions (start, length).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]
    branch_ids: tuple[int, ...]
    members: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.input_ids)


#: a completion's trainable tokens: all or none, or token by token (a multi-turn rollout's own tokens, not the
#: tool's)
Trainable = bool | Sequence[bool]


def completion_documents(
    prompt_ids: Sequence[int], completions: Sequence[tuple[int, Sequence[int], Trainable]], *, share_prompt: bool
) -> list[Document]:
    """Documents for `completions` = (member, token ids, trainable) of one prompt: one per completion, or one in all
    when `share_prompt`. Tokens that are not trainable are still laid out; their labels are IGNORE_INDEX."""
    prompt = tuple(prompt_ids)
    if not prompt:
        raise ValueError("a completion needs a prompt of at least one token")

    def labels_of(tokens: Sequence[int], trainable: Trainable) -> tuple[int, ...]:
        flags = [trainable] * len(tokens) if isinstance(trainable, bool) else list(trainable)
        if len(flags) != len(tokens):
            raise ValueError(f"{len(flags)} trainable flags for a completion of {len(tokens)} tokens")
        return (*(token if flag else IGNORE_INDEX for token, flag in zip(tokens, flags)), IGNORE_INDEX)

    if not share_prompt:
        return [
            Document(
                input_ids=prompt + tuple(tokens),
                labels=(IGNORE_INDEX,) * (len(prompt) - 1) + labels_of(tokens, trainable),
                position_ids=tuple(range(len(prompt) + len(tokens))),
                branch_ids=(0,) * (len(prompt) + len(tokens)),
                members=(member,),
                spans=((len(prompt) - 1, len(tokens)),),
            )
            for member, tokens, trainable in completions
        ]
    shared = len(prompt) - 1
    input_ids, labels = list(prompt[:-1]), [IGNORE_INDEX] * shared
    position_ids, branch_ids = list(range(shared)), [0] * shared
    members, spans = [], []
    for branch, (member, tokens, trainable) in enumerate(completions, start=1):
        members.append(member)
        spans.append((len(input_ids), len(tokens)))
        input_ids += (prompt[-1], *tokens)
        labels += labels_of(tokens, trainable)
        position_ids += range(shared, shared + len(tokens) + 1)
        branch_ids += [branch] * (len(tokens) + 1)
    return [
        Document(tuple(input_ids), tuple(labels), tuple(position_ids), tuple(branch_ids), tuple(members), tuple(spans))
    ]


def document_rows(documents: Sequence[Document], capacity: int, *, pack: bool) -> list[list[Document]]:
    """Best-fit-decreasing rows of at most `capacity` tokens, or (`pack=False`, the padded layout) one per row."""
    if not pack:
        return [[document] for document in documents]
    return [[documents[i] for i in indices] for indices in best_fit_decreasing([len(d) for d in documents], capacity)]


def collate_documents(
    rows: Sequence[Sequence[Document]], pad_id: int, *, capacity: int, flatten: bool
) -> dict[str, torch.Tensor]:
    """Rows of documents -> the model's inputs, and `unpack_index`, which reads the completions back out of them.

    `input_ids`/`position_ids`/`labels` are [rows, width]. Documents with branches get an `attention_mask`
    [rows, 1, width, width] (True: may attend): causal, inside one document, and from a branch to itself and the
    shared tokens only. Otherwise position ids restarting per document keep attention inside it, as in packed
    mid-training, and `flatten` puts everything in one padding-free row (flash-attn varlen).
    `unpack_index` [completions, longest] holds each completion's label positions in the flattened rows, members
    in ascending order, and `rows*width` (a zero slot) past its end; `targets` are the labels read through it.
    """
    num_slots = len(rows) * capacity
    if flatten:
        rows = [[document for row in rows for document in row]]
    branched = any(len(document.members) > 1 for row in rows for document in row)
    if branched and flatten:
        raise ValueError(
            "prompt-shared documents need an attention mask, which the flattened (flash-attn) layout has not"
        )
    width = max(sum(len(document) for document in row) for row in rows)
    members = sorted(member for row in rows for document in row for member in document.members)
    local = {member: index for index, member in enumerate(members)}
    longest = max((length for row in rows for document in row for _, length in document.spans), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    document_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    branch_ids = torch.zeros((len(rows), width), dtype=torch.long)
    unpack_index = torch.full((len(members), max(longest, 1)), len(rows) * width, dtype=torch.long)
    real_tokens = 0
    for row_index, row in enumerate(rows):
        cursor = 0
        for document_index, document in enumerate(row):
            end = cursor + len(document)
            input_ids[row_index, cursor:end] = torch.tensor(document.input_ids)
            labels[row_index, cursor:end] = torch.tensor(document.labels)
            position_ids[row_index, cursor:end] = torch.tensor(document.position_ids)
            document_ids[row_index, cursor:end] = document_index
            branch_ids[row_index, cursor:end] = torch.tensor(document.branch_ids)
            for member, (start, length) in zip(document.members, document.spans):
                first = row_index * width + cursor + start
                unpack_index[local[member], :length] = torch.arange(first, first + length)
            cursor = end
        real_tokens += cursor
        position_ids[row_index, cursor:] = torch.arange(width - cursor)
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "unpack_index": unpack_index,
        "targets": unpack(labels, unpack_index, fill=IGNORE_INDEX),
        "members": torch.tensor(members, dtype=torch.long),
        "num_tokens": torch.tensor(real_tokens),
        "num_slots": torch.tensor(num_slots),
    }
    if branched:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
        query_branch, key_branch = branch_ids.unsqueeze(-1), branch_ids.unsqueeze(-2)
        visible = (key_branch == 0) | (key_branch == query_branch)
        batch["attention_mask"] = (causal & same_document & visible).unsqueeze(1)
    return batch


def unpack(values: torch.Tensor, unpack_index: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """[rows, width] per-position values -> [completions, longest] through `collate_documents`' index."""
    flat = torch.cat([values.reshape(-1), values.new_full((1,), fill)])
    return flat[unpack_index]
