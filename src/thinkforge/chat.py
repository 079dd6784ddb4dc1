"""How conversations become tokens, for one tokenizer: the chat template, the system prompt, the turn's end token
and every token that ends a completion. One `ChatFormat`, built once from the model's settings, is what every
stage, rollout engine, held-out score, `thinkforge-eval`, `thinkforge-data` and the doctor render and stop with,
so SFT trains the very end token that generation stops at and RL scores the prompt the engine was given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from thinkforge.config import ModelConfig
from thinkforge.tokenizer import build_synthetic_tokenizer

Message = dict[str, Any]

_REPLY_MARK = "\u00a7reply\u00a7"
_RESULT_MARK = "\u00a7result\u00a7"

#: the Python tool, as a template with a tool-call syntax lists it for the model (OpenAI's function schema)
PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Runs Python code and returns what it prints (and its error, if it raises).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the code to run"}},
            "required": ["code"],
        },
    },
}
_FENCE_OPENER = re.compile(r"```(?:python|py|python3)[ \t]*\n")


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """`model.tokenizer`, else the model's own, else (a model built from a config) the built-in tokenizer."""
    source = model.tokenizer or model.name_or_path
    if source is None:
        return build_synthetic_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def declared_end_ids(model: ModelConfig) -> list[int]:
    """The end tokens the checkpoint declares (`generation_config.eos_token_id`, an int or a list; without a
    generation config, the model config's), which HF generate would stop at."""
    if model.name_or_path is None:
        return []
    remote = model.trust_remote_code
    try:
        declared = GenerationConfig.from_pretrained(model.name_or_path, trust_remote_code=remote).eos_token_id
    except OSError:
        declared = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=remote).eos_token_id
    return [] if declared is None else [declared] if isinstance(declared, int) else list(declared)


def turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template closes an assistant reply with (`<|im_end|>`, `<|eot_id|>`, ...).

    It need not be the tokenizer's EOS: Qwen2.5 base tokenizers end text with `<|endoftext|>` and chat turns with
    `<|im_end|>`. Found by rendering a reply and reading the special token right after it; the EOS when there is
    no template or no such token.
    """
    conversation = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    except (ValueError, TypeError):
        return str(tokenizer.eos_token)
    end = text.find(_REPLY_MARK)
    if end < 0:
        return str(tokenizer.eos_token)
    tail = text[end + len(_REPLY_MARK) :]
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
    matches = [token for token in specials if token and tail.startswith(token)]
    return max(matches, key=len) if matches else str(tokenizer.eos_token)


class ChatFormat:
    """The tokenizer's chat template with `system_prompt` first unless a conversation brings its own, and the
    tokens that end a completion: the turn's end, the tokenizer's EOS and the checkpoint's declared ones."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
        declared_ends: Sequence[int] = (),
        *,
        tools: bool = False,
    ) -> None:
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        #: the tools a template with a tool-call syntax lists for the model (its system prompt describes them)
        self.tools: list[dict[Any, Any] | Callable[..., Any]] = [PYTHON_TOOL] if tools else []
        self.turn_end = turn_end_token(tokenizer)
        self.turn_end_id = int(tokenizer.convert_tokens_to_ids(self.turn_end))  # type: ignore[arg-type]
        ids = [self.turn_end_id, tokenizer.eos_token_id, *declared_ends]
        #: every token that ends a completion, the turn's end first: the stop set of every engine and of `finished`
        self.end_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))

    @classmethod
    def for_model(cls, model: ModelConfig, system_prompt: str | None = None, *, tools: bool = False) -> ChatFormat:
        return cls(load_tokenizer(model), system_prompt, declared_end_ids(model), tools=tools)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def with_system(self, messages: Sequence[Message]) -> list[Message]:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text of `messages`, the system prompt first."""
        return self._template(self.with_system(messages), add_generation_prompt=add_generation_prompt)

    def _template(self, conversation: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(
            list(conversation), tools=self.tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def prompt(self, problem: str) -> str:
        """A problem as the start of an assistant reply: what every engine is given."""
        return self.render([{"role": "user", "content": problem}], add_generation_prompt=True)

    def exchange(self, problem: str, reply: str) -> str:
        """A problem and its reply as one finished chat exchange."""
        return self.render([{"role": "user", "content": problem}, {"role": "assistant", "content": reply}])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def reply_ids(self, reply: str, finished: bool = True) -> list[int]:
        """A reply's tokens as a sampler would have produced them: ended by the turn's end token when it finished."""
        return self.encode(reply) + ([self.turn_end_id] if finished else [])

    def reply_targets(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """The conversation's tokens and which are targets: each assistant reply up to and including its end token.

        A reply's characters are found by rendering the conversation up to it with the generation prompt and up to
        its end: this works for any chat template that renders a conversation's prefixes as its prefix.
        """
        messages = self.with_system(messages)
        template = self._template
        text = template(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(template(messages[:index], add_generation_prompt=True))
            upto = template(messages[: index + 1])
            if not text.startswith(upto) or len(upto) < start:
                raise ValueError("the chat template does not render conversation prefixes as prefixes; cannot mask")
            end_at = upto.find(self.turn_end, start)
            spans.append((start, end_at + len(self.turn_end) if end_at >= 0 else len(upto)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(low <= begin < high for low, high in spans) for begin, _ in encoded["offset_mapping"]]
        return list(encoded["input_ids"]), mask


class ToolTemplateError(ValueError):
    """The chat template cannot carry tool turns token for token."""


@dataclass(frozen=True)
class ToolFormat:
    """How the model calls the Python tool and how the result comes back, for one chat template.

    A call is the template's own `<tool_call>` JSON (`hermes`: Qwen2.5's), or a fenced Python block (`fenced`);
    generation stops at `call_end`. What follows a call is what the template itself renders after an assistant
    turn when a tool turn comes next: the turn's end, the tool turn around the result, and the start of the next
    assistant turn. It is found by rendering a conversation with placeholders, so any template that renders a
    conversation's prefixes as its prefix works, and the trainer's tokens are the template's.
    """

    syntax: str
    call_end: str
    before_result: str
    after_result: str

    @classmethod
    def for_chat(cls, chat: ChatFormat, syntax: str = "auto") -> ToolFormat:
        template = str(getattr(chat.tokenizer, "chat_template", None) or "")
        if syntax == "auto":
            syntax = "hermes" if "<tool_call>" in template else "fenced"
        conversation = [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": _REPLY_MARK},
            {"role": "tool", "content": _RESULT_MARK},
        ]
        try:
            with_tool = chat.render(conversation, add_generation_prompt=True)
            reply_only = chat.render(conversation[:2])
        except Exception as error:  # templates raise their own errors for a role they do not know
            raise ToolTemplateError(f"the chat template has no tool role ({error}); tools need one") from None
        if _RESULT_MARK not in with_tool:
            raise ToolTemplateError("the chat template drops tool messages; tools need a template with a tool role")
        cut = reply_only.find(_REPLY_MARK) + len(_REPLY_MARK)
        if not with_tool.startswith(reply_only[:cut]):
            raise ToolTemplateError(
                "the chat template renders a reply differently once a tool turn follows it, so the tokens sampled "
                "for it would not be the ones it renders"
            )
        after_reply = with_tool[cut:]
        before, after = after_reply.split(_RESULT_MARK, 1)
        return cls(syntax, "</tool_call>" if syntax == "hermes" else "```\n", before, after)

    def parse(self, turn: str) -> tuple[str | None, str | None]:
        """A turn that ended at `call_end`: the code it calls, or why there is none: "nested" (a call opened inside
        another), "malformed" (no opening, not the tool's JSON)."""
        body_end = turn.rfind(self.call_end)
        if self.syntax == "hermes":
            start = turn.rfind("<tool_call>", 0, body_end)
            if start < 0:
                return None, "malformed"
            body = turn[start + len("<tool_call>") : body_end]
            if "<tool_call>" in turn[:start]:
                return None, "nested"
            try:
                call = json.loads(body)
                arguments = call.get("arguments", {})
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                code = arguments.get("code")
            except (json.JSONDecodeError, AttributeError):
                return None, "malformed"
            if call.get("name") != "python" or not isinstance(code, str):
                return None, "malformed"
            return code, None
        openers = list(_FENCE_OPENER.finditer(turn, 0, body_end))
        if not openers:
            return None, "malformed"
        if len(openers) > 1:
            return None, "nested"
        return turn[openers[-1].end() : body_end], None

    def opens_call(self, turn: str) -> bool:
        """Whether a turn that ended without a call left one open."""
        if self.syntax == "hermes":
            return turn.count("<tool_call>") > turn.count("</tool_call>")
        openers = list(_FENCE_OPENER.finditer(turn))
        return bool(openers) and "```" not in turn[openers[-1].end() :]

    def result(self, output: str) -> str:
        """The text inserted after a call: the end of the model's turn, the tool turn with `output`, and the start of
        the model's next turn, as the template renders them."""
        return self.before_result + output + self.after_result
