"""Chat SFT: loss only on the assistant's tokens, its end-of-turn token included so the model learns to stop.

The replies come from the data, or (`stage.replies=rejection`, DeepSeek-R1's third stage) from the starting model's
own verified-correct samples of prompt + gold rows, sampled once before training."""

from __future__ import annotations

import functools
import logging
from typing import Any

from thinkforge.data.packing import TokenSequence
from thinkforge.data.records import GOLD, load_split
from thinkforge.resume import sampled_rows_path
from thinkforge.rollout import SamplingConfig
from thinkforge.rollout.pairs import verified_replies
from thinkforge.stage_configs import SFTConfig
from thinkforge.stages.causal import CausalLMStage, CausalProbe
from thinkforge.stages.own_samples import sample_once
from thinkforge.stages.probe import StageProbe, TrainingExample, capped, formatted_answer
from thinkforge.tokenizer import turn_end_token

log = logging.getLogger(__name__)


class SFTProbe(CausalProbe):
    """Each conversation up to its first reply is the prompt; the loss mask is the stage's own. Rejection-sampled
    replies are sampled when training starts, so formatted gold answers stand in for them."""

    def examples(self, count: int) -> list[TrainingExample]:
        stage: SFT = self.stage
        if stage.rejection is not None:
            return [self.reply_example(prompt, formatted_answer(gold)) for prompt, gold in self.gold_rows(count)]
        examples = []
        for messages in self.stage.conversations("train")[:count]:
            first_reply = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
            prompt = self.stage.render_chat(messages[:first_reply], add_generation_prompt=True)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            examples.append(TrainingExample(prompt_ids, self.stage.assistant_only(messages), self.turn_end_id))
        return examples

    def sampling(self) -> SamplingConfig | None:
        return None if self.stage.rejection is None else capped(self.stage.rejection)


class SFT(CausalLMStage):
    """`format=prompt_completion` reads prompt/completion fields; `format=messages` reads chat `messages` lists."""

    def __init__(self, run, tokenizer) -> None:
        super().__init__(run, tokenizer)
        self.settings: SFTConfig = run.stage
        self.format = self.settings.format
        # the token the template closes a reply with, which generation also stops at (not always the EOS)
        self.turn_end = turn_end_token(tokenizer)
        rollout = self.settings.rollout
        self.rejection = (
            SamplingConfig(rollout.num_samples, rollout.temperature, rollout.top_p, rollout.max_new_tokens)
            if self.settings.replies == "rejection"
            else None
        )
        self.items_need_model = self.rejection is not None

    def probe(self) -> StageProbe:
        return SFTProbe(self)

    def completion_length(self) -> int:
        return self.run.data.max_sequence_length if self.rejection is None else self.rejection.max_new_tokens

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        if self.rejection is not None:
            rows = self.rejection_sampled(split)
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

    def rejection_sampled(self, split: str) -> list[dict[str, Any]]:
        """The starting model's verified-correct replies to the split's prompt + gold rows, sampled once."""
        data = self.run.data
        records = load_split(data, split, required=("prompt", GOLD))
        rows = records.rows[: data.max_val_rows] if split == "val" else self.heldout.training_rows(records)
        select = functools.partial(verified_replies, max_per_prompt=self.settings.rollout.max_per_prompt)
        path = sampled_rows_path(self.run.output_dir, "rejection_sampled", split)
        return sample_once(self, rows, self.rejection, path, select)

    def on_fit_start(self) -> None:
        """Rejection samples are drawn here, from the policy on its device and still the starting checkpoint (both
        splits: validation comes later, from a trained policy)."""
        super().on_fit_start()
        if self.rejection is not None:
            for split in ("train", "val"):
                self.trainer.datamodule.items(split)

    def sequences(self, split: str) -> list[TokenSequence]:
        return [self.assistant_only(messages) for messages in self.conversations(split)]

    def assistant_only(self, messages: list[dict[str, Any]]) -> TokenSequence:
        """Tokens of the rendered conversation; targets are each assistant reply up to and including its end token.

        The reply's characters are found by rendering the conversation up to it with the generation prompt and
        up to its end: this works for any chat template that renders a conversation's prefixes as its prefix.
        """
        if self.run.data.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.run.data.system_prompt}, *messages]
        template = self.tokenizer.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(template(messages[:index], tokenize=False, add_generation_prompt=True))
            upto = template(messages[: index + 1], tokenize=False)
            if not text.startswith(upto) or len(upto) < start:
                raise ValueError("the chat template does not render conversation prefixes as prefixes; cannot mask")
            end_at = upto.find(self.turn_end, start)
            spans.append((start, end_at + len(self.turn_end) if end_at >= 0 else len(upto)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(lo <= begin < hi for lo, hi in spans) for begin, _ in encoded["offset_mapping"]]
        return TokenSequence.causal(encoded["input_ids"], mask)
