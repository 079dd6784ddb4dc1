"""Stages trained with next-token loss on (packed) sequences: mid-training and SFT differ only in their labels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import TokenSequence, collate_rows, fill_ratio, fit_to_length, pack
from thinkforge.losses import LossSum, causal_lm_loss
from thinkforge.stages.base import Stage
from thinkforge.stages.completions import Batch
from thinkforge.stages.probe import StageProbe, TrainingExample

log = logging.getLogger(__name__)


#: the causal stage a `CausalProbe` reads (SFT's probe reads an SFT stage)
CausalStageT = TypeVar("CausalStageT", bound="CausalLMStage")


class CausalProbe(StageProbe[CausalStageT]):
    """Every training document, loss on its targets; `end_id` is the token each must end with (default: the chat
    turn's end)."""

    def __init__(self, stage: CausalStageT, end_id: int | None = None) -> None:
        super().__init__(stage)
        self.end_id = self.chat.turn_end_id if end_id is None else end_id

    def examples(self, count: int) -> list[TrainingExample]:
        return [TrainingExample([], sequence, self.end_id) for sequence in self.stage.sequences("train")[:count]]

    def packed_documents(self, count: int) -> list[TokenSequence]:
        data = self.stage.run.data
        return (
            fit_to_length(self.stage.sequences("train")[:count], data.max_sequence_length, "truncate")[0]
            if data.pack
            else []
        )


class CausalLMStage(Stage):
    """Token-mean cross-entropy over the global batch's target tokens; subclasses say which tokens are targets."""

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__(run, chat)
        # flash-attn takes every document of a micro-batch as one padding-free row; SDPA keeps [B, L] rows
        self.flatten_rows = self.attention == "flash_attention_2"
        # unpadded rows are cut to their micro-batch's longest, rounded up to tensor-core friendly widths on GPU
        self.pad_multiple = run.data.pad_to_multiple_of or (64 if torch.cuda.is_available() else 8)

    def sequences(self, split: str) -> list[TokenSequence]:
        raise NotImplementedError

    def build_items(self, split: str) -> Sequence[Any]:
        data = self.run.data
        sequences, overflow = fit_to_length(self.sequences(split), data.max_sequence_length, data.overflow)
        if split == "val":
            sequences = sequences[: data.max_val_rows]
        overflowed = "".join(f", {count} {what}" for what, count in overflow.items())
        if data.pack:
            rows = pack(sequences, data.max_sequence_length)
            log.info(
                "%s: %d sequences -> %d rows of %d tokens, fill ratio %.3f%s",
                split,
                len(sequences),
                len(rows),
                data.max_sequence_length,
                fill_ratio(rows, data.max_sequence_length),
                overflowed,
            )
            return rows
        lengths = sorted(len(sequence) for sequence in sequences)
        log.info(
            "%s: %d sequences, one per row, padded to each micro-batch's longest (multiple of %d%s); "
            "lengths: median %d, longest %d%s",
            split,
            len(sequences),
            self.pad_multiple,
            ", grouped by length" if data.group_by_length else "",
            lengths[len(lengths) // 2] if lengths else 0,
            lengths[-1] if lengths else 0,
            overflowed,
        )
        return [[sequence] for sequence in sequences]

    def probe(self) -> CausalProbe[Any]:
        return CausalProbe(self)

    def item_length(self, item: Sequence[TokenSequence]) -> int:
        return sum(len(sequence) for sequence in item)

    def collate(self, items: Sequence[Any]) -> Batch:
        row_length = self.run.data.max_sequence_length if self.run.data.pack else None
        return collate_rows(
            items,
            self.tokenizer.pad_token_id,
            row_length=row_length,
            flatten=self.flatten_rows,
            pad_multiple=self.pad_multiple,
        )

    def loss_sum(self, batch: Batch) -> LossSum:
        logprobs, _ = self.policy(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        return causal_lm_loss(logprobs, batch["labels"])
