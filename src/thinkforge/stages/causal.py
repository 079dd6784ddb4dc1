"""Stages trained with next-token loss on (packed) sequences: mid-training and SFT differ only in their labels."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from thinkforge.data.packing import TokenSequence, collate_rows, fill_ratio, fit_to_length, pack
from thinkforge.losses import LossSum, causal_lm_loss
from thinkforge.stages.base import Batch, Stage

log = logging.getLogger(__name__)


class CausalLMStage(Stage):
    """Token-mean cross-entropy over the global batch's target tokens; subclasses say which tokens are targets."""

    def sequences(self, split: str) -> list[TokenSequence]:
        raise NotImplementedError

    def build_items(self, split: str) -> Sequence[Any]:
        data = self.run.data
        sequences, overflow = fit_to_length(self.sequences(split), data.max_length, data.overflow)
        if split == "val":
            sequences = sequences[: data.max_val_rows]
        rows = pack(sequences, data.max_length) if data.pack else [[sequence] for sequence in sequences]
        log.info(
            "%s: %d sequences -> %d rows of %d tokens, fill ratio %.3f%s",
            split, len(sequences), len(rows), data.max_length, fill_ratio(rows, data.max_length),
            "".join(f", {count} {what}" for what, count in overflow.items()),
        )
        return rows

    def collate(self, items: Sequence[Any]) -> Batch:
        return collate_rows(items, self.tokenizer.pad_token_id, row_length=self.run.data.max_length, flatten=self.flatten_rows)

    def loss_sum(self, batch: Batch) -> LossSum:
        logprobs, _ = self.policy(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        return causal_lm_loss(logprobs, batch["labels"])
