"""Chat SFT: loss only on the assistant's tokens, its end-of-turn token included so the model learns to stop."""

from __future__ import annotations

import logging
from typing import Any

from thinkforge.data.packing import TokenSequence
from thinkforge.data.records import load_split
from thinkforge.stages.causal import CausalLMStage, CausalProbe
from thinkforge.stages.probe import StageProbe, TrainingExample
from thinkforge.tokenizer import turn_end_token

log = logging.getLogger(__name__)


class SFTProbe(CausalProbe):
    """Each conversation up to its first reply is the prompt; the loss mask is the stage's own."""

    def examples(self, count: int) -> list[TrainingExample]:
        examples = []
        for messages in self.stage.conversations("train")[:count]:
            first_reply = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
            prompt = self.stage.render_chat(messages[:first_reply], add_generation_prompt=True)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            examples.append(TrainingExample(prompt_ids, self.stage.assistant_only(messages), self.turn_end_id))
        return examples


class SFT(CausalLMStage):
    """`format=prompt_completion` reads prompt/completion fields; `format=messages` reads chat `messages` lists."""

    def __init__(self, run, tokenizer) -> None:
        super().__init__(run, tokenizer)
        self.format = run.stage.format
        # the token the template closes a reply with, which generation also stops at (not always the EOS)
        self.turn_end = turn_end_token(tokenizer)

    def probe(self) -> StageProbe:
        return SFTProbe(self)

    def conversations(self, split: str) -> list[list[dict[str, str]]]:
        data = self.run.data
        required = ("messages",) if self.format == "messages" else ("prompt", "completion")
        records = load_split(data, split, required)
        log.info("%s data: %s", split, records.summary())
        if self.format == "messages":
            return [record["messages"] for record in records.rows]
        return [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            for r in records.rows
        ]

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
