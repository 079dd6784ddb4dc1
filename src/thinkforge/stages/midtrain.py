"""Packed causal-LM mid-training on chain-of-thought traces (Phi-4-mini "distillation mid-training")."""

from __future__ import annotations

import logging

from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import TokenSequence
from thinkforge.data.records import load_split
from thinkforge.stages.causal import CausalLMStage, CausalProbe

log = logging.getLogger(__name__)


class MidTraining(CausalLMStage):
    """Every token of every document is a target; documents are packed into rows without cross-talk.

    `documents=chat` renders prompt + completion as one chat exchange (as SFT and evaluation will see them);
    `documents=text` trains on a raw `text` field.
    """

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__(run, chat)
        self.document_format = run.stage.documents

    def probe(self) -> CausalProbe[MidTraining]:
        """A raw text document ends with the EOS token; a chat one with the turn's end."""
        return CausalProbe(self, self.tokenizer.eos_token_id if self.document_format == "text" else None)

    def sequences(self, split: str) -> list[TokenSequence]:
        data = self.run.data
        text_mode = self.document_format == "text"
        records = load_split(data, split, required=("text",) if text_mode else ("prompt", "completion"))
        log.info("%s data: %s", split, records.summary())
        if text_mode:
            texts = [record["text"] + self.tokenizer.eos_token for record in records.rows]
        else:
            texts = [self.chat.exchange(r["prompt"], r["completion"]) for r in records.rows]
        encoded = self.chat.encode_many(texts)
        return [TokenSequence.causal(ids) for ids in encoded]
