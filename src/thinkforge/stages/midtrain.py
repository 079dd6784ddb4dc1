"""Packed causal-LM mid-training on long chain-of-thought traces (Phi-4-mini "distillation mid-training")."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from thinkforge.backbone import resolve_attn_implementation
from thinkforge.config import ConfigError
from thinkforge.data.packing import TokenSequence, collate_rows, fill_ratio, fit_to_length, pack
from thinkforge.data.records import load_records
from thinkforge.losses import causal_lm_loss_sum
from thinkforge.stages.base import Batch, Stage

log = logging.getLogger(__name__)


class MidTraining(Stage):
    """Every token of every document is a target; documents are packed into rows without cross-talk.

    `documents=chat` renders prompt + completion as one chat exchange (as SFT and evaluation will see them);
    `documents=text` trains on a raw `text` field.
    """

    def __init__(self, run, tokenizer, documents: str = "chat") -> None:
        super().__init__(run, tokenizer)
        if documents not in ("chat", "text"):
            raise ConfigError(f"stage.documents: must be 'chat' or 'text'; got {documents!r}")
        self.document_format = documents

    def documents(self, split: str) -> list[TokenSequence]:
        data = self.run.data
        source = data.train if split == "train" else data.val
        text_mode = self.document_format == "text"
        records = load_records(
            source,
            data.train_split if split == "train" else data.val_split,
            data,
            required=("text",) if text_mode else ("prompt", "completion"),
        )
        log.info("%s data: %s", split, records.summary())
        if text_mode:
            texts = [record["text"] + self.tokenizer.eos_token for record in records.rows]
        else:
            texts = [self.render_chat(record["prompt"], record["completion"]) for record in records.rows]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [TokenSequence.causal(ids) for ids in encoded]

    def render_chat(self, prompt: str, completion: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if self.run.data.system_prompt:
            messages.insert(0, {"role": "system", "content": self.run.data.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def build_items(self, split: str) -> Sequence[Any]:
        data = self.run.data
        sequences, overflow = fit_to_length(self.documents(split), data.max_length, data.overflow)
        if split == "val":
            sequences = sequences[: data.max_val_rows]
        rows = pack(sequences, data.max_length) if data.pack else [[sequence] for sequence in sequences]
        log.info(
            "%s: %d documents -> %d rows of %d tokens, fill ratio %.3f%s",
            split, len(sequences), len(rows), data.max_length, fill_ratio(rows, data.max_length),
            "".join(f", {count} {what}" for what, count in overflow.items()),
        )
        return rows

    def collate(self, items: Sequence[Any]) -> Batch:
        flatten = resolve_attn_implementation(self.run.model.attn_implementation) == "flash_attention_2"
        return collate_rows(items, self.tokenizer.pad_token_id, row_length=self.run.data.max_length, flatten=flatten)

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs, _ = self.policy(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        loss, _ = causal_lm_loss_sum(logprobs, batch["labels"])
        return loss, {}
