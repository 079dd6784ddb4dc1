"""Chat SFT: loss only on the assistant's tokens, its end-of-turn token included so the model learns to stop.

The replies come from the data, or (`stage.replies=rejection`, DeepSeek-R1's third stage) from the starting model's
own verified-correct samples of prompt + gold rows, sampled once before training."""

from __future__ import annotations

import functools
import logging
from typing import Any

from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import TokenSequence
from thinkforge.data.records import GOLD, load_split
from thinkforge.resume import sampled_rows_path
from thinkforge.rollout.pairs import verified_replies
from thinkforge.rollout.settings import SamplingParams
from thinkforge.stage_configs import SFTConfig
from thinkforge.stages.causal import CausalLMStage, CausalProbe
from thinkforge.stages.own_samples import sample_once
from thinkforge.stages.probe import TrainingExample, capped, formatted_answer

log = logging.getLogger(__name__)


class SFTProbe(CausalProbe["SFT"]):
    """Each conversation up to its first reply is the prompt; the loss mask is the stage's own. Rejection-sampled
    replies are sampled when training starts, so formatted gold answers stand in for them."""

    def examples(self, count: int) -> list[TrainingExample]:
        stage = self.stage
        if stage.rejection is not None:
            return [self.reply_example(prompt, formatted_answer(gold)) for prompt, gold in self.gold_rows(count)]
        examples = []
        for messages in self.stage.conversations("train")[:count]:
            first_reply = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
            prompt_ids = self.chat.encode(self.chat.render(messages[:first_reply], add_generation_prompt=True))
            examples.append(TrainingExample(prompt_ids, self.stage.assistant_only(messages), self.chat.turn_end_id))
        return examples

    def sampling(self) -> SamplingParams | None:
        return None if self.stage.rejection is None else capped(self.stage.rejection)


class SFT(CausalLMStage):
    """`format=prompt_completion` reads prompt/completion fields; `format=messages` reads chat `messages` lists."""

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__(run, chat)
        self.settings: SFTConfig = run.stage
        self.format = self.settings.format
        self.rejection: SamplingParams | None = (
            self.settings.sampling.at() if self.settings.replies == "rejection" else None
        )
        self.items_need_model = self.rejection is not None

    def probe(self) -> SFTProbe:
        return SFTProbe(self)

    def completion_length(self) -> int:
        return self.run.data.max_sequence_length if self.rejection is None else self.rejection.max_new_tokens

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        if self.rejection is not None:
            rows = self.rejection_sampled(split, self.rejection)
        elif self.format == "messages":
            records = load_split(self.run.data, split, ("messages",))
            log.info("%s data: %s", split, records.summary())
            return [record["messages"] for record in records.rows]
        else:
            records = load_split(self.run.data, split, ("prompt", "completion"))
            log.info("%s data: %s", split, records.summary())
            rows = records.rows
        return [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}] for r in rows
        ]

    def rejection_sampled(self, split: str, sampling: SamplingParams) -> list[dict[str, Any]]:
        """The starting model's verified-correct replies to the split's prompt + gold rows, sampled once."""
        data = self.run.data
        records = load_split(data, split, required=("prompt", GOLD))
        rows = records.rows[: data.max_val_rows] if split == "val" else self.heldout.training_rows(records)
        select = functools.partial(verified_replies, max_per_prompt=self.settings.max_per_prompt)
        path = sampled_rows_path(self.run.output_dir, "rejection_sampled", split)
        return sample_once(self, rows, sampling, path, select)

    def on_fit_start(self) -> None:
        """Rejection samples are drawn here, from the policy on its device and still the starting checkpoint (both
        splits: validation comes later, from a trained policy)."""
        super().on_fit_start()
        if self.rejection is not None:
            for split in ("train", "val"):
                self.loaded_data.items(split)

    def sequences(self, split: str) -> list[TokenSequence]:
        return [self.assistant_only(messages) for messages in self.conversations(split)]

    def assistant_only(self, messages: list[dict[str, Any]]) -> TokenSequence:
        """Tokens of the rendered conversation; targets are each assistant reply up to and including its end token."""
        ids, mask = self.chat.reply_targets(messages)
        return TokenSequence.causal(ids, mask)
