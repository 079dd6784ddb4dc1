"""The rollout interface: prompts in, completions out. `hf` samples the live policy; `vllm` keeps its own copy of
the weights, which `update_weights` replaces after the policy's optimizer steps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from thinkforge.progress import GenerationProgress
from thinkforge.rollout.settings import SamplingParams

#: what an engine samples from: a rendered prompt, or token ids (a multi-turn rollout goes on from its own tokens,
#: never from text rendered again)
EnginePrompt = str | Sequence[int]


def prompt_token_ids(tokenizer: Any, prompts: Sequence[EnginePrompt]) -> list[list[int]]:
    """Each prompt's token ids: texts encoded without special tokens (the chat template has put them in), ids as
    they are."""
    texts = [prompt for prompt in prompts if isinstance(prompt, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [list(next(encoded)) if isinstance(prompt, str) else list(prompt) for prompt in prompts]


@dataclass(frozen=True)
class ToolCall:
    """One tool call of a multi-turn rollout and how it went."""

    #: ran to its end without an exception, within its limits
    ok: bool
    seconds: float = 0.0
    timed_out: bool = False
    #: why it was not run: "malformed", "nested", "unclosed", "max_turns", "step_budget"; None when it ran
    not_run: str | None = None


@dataclass(frozen=True)
class Rollout:
    prompt_index: int
    #: the model's own text (a multi-turn rollout's model turns, joined): what the rewards read
    text: str
    token_ids: tuple[int, ...]
    # Ended with EOS within max_new_tokens; False means truncated or stopped by a stop string.
    finished: bool
    # The stop string that ended it, if one did.
    stopped_by: str | None = None
    # log p(token) of each completion token under the distribution it was sampled from (logits / T, top-p
    # renormalised): what the trainer's recomputed log-probs must match.
    logprobs: tuple[float, ...] = ()
    #: per token, whether the environment inserted it (a tool's result and the template's turn markers around it):
    #: such tokens carry no loss, advantage or KL; empty when every token was sampled
    inserted: tuple[bool, ...] = ()
    #: a multi-turn rollout's conversation after the prompt: (role, text) turns, "assistant" or "tool"
    turns: tuple[tuple[str, str], ...] = ()
    calls: tuple[ToolCall, ...] = ()
    #: the optimizer step whose weights sampled it (its staleness, when trained at step t, is t - policy_version)
    policy_version: int = 0

    @property
    def trainable(self) -> tuple[bool, ...]:
        """Per token: sampled by the model (and so scored by the loss)."""
        return tuple(not inserted for inserted in self.inserted) if self.inserted else (True,) * len(self.token_ids)

    @property
    def transcript(self) -> str:
        """The text with the tool's results in place, for logs and samples."""
        if not self.turns:
            return self.text
        return "".join(text if role == "assistant" else f"\n[{role}]\n{text}\n[/{role}]\n" for role, text in self.turns)


class Generate(Protocol):
    """What samples a rank's prompts: an engine's `generate` bound to its weights, or a stage's (policy, seed and
    progress wired in); GRPO's groups and the held-out scores take either."""

    def __call__(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """This rank's prompts, sampled."""


class RolloutEngine(Protocol):
    #: whether the engine samples its own copy of the weights, which `update_weights` must refresh
    holds_weights: bool

    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """`num_samples` rollouts for each prompt, grouped by prompt, in prompt order; the same seed gives the
        same rollouts whatever else is in the batch. `progress` hears of the samples as they finish."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, version: int = 0) -> None:
        """Sample from these (HF-named, full) weights, of optimizer step `version`, from now on."""

    def read_weights(self, positions: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor | None]]:
        """The elements at `positions` [elements, ndim] of the weights it samples, by HF name (None for a tensor it
        keeps in a layout of its own), for each copy it samples from ("the engine", or each server replica): what
        the check after each weight push compares with the trainer's (`rollout/weight_check.py`)."""

    def sleep(self) -> None:
        """Free what sampling holds (a KV cache) while the trainer runs; the next call wakes it."""

    def close(self) -> None:
        """Stop what the engine started outside this process (a server); it samples no more."""


def rollout_of(
    tokenizer: Any,
    index: int,
    row: Sequence[int],
    logprobs: Sequence[float],
    end_ids: Sequence[int],
    stop_strings: Sequence[str],
) -> Rollout:
    """A generated row cut after its first end token, or after the first stop string (an engine may stop a row
    later than that when the string straddles tokens; the rest is padding), with the same rule for `finished`
    whichever engine sampled it. The cut is the shortest prefix whose text holds a stop string, found by
    bisection: a few decodes per row, not one per token."""
    row = list(row)
    end = next((position for position, token in enumerate(row) if token in end_ids), None)
    finished = end is not None
    tokens = row if end is None else row[: end + 1]
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if any(s in text for s in stop_strings):
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            prefix = tokenizer.decode(tokens[:middle], skip_special_tokens=False)
            low, high = (low, middle) if any(s in prefix for s in stop_strings) else (middle + 1, high)
        tokens = tokens[:low]
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        stop = min((s for s in stop_strings if s in text), key=text.index)
        return Rollout(index, text, tuple(tokens), False, stop, tuple(logprobs[:low]))
    # the text is the reply without its end token; token_ids keep it, as the trainer scores it
    text = tokenizer.decode(tokens[:-1], skip_special_tokens=False) if finished else text
    return Rollout(index, text, tuple(tokens), finished, None, tuple(logprobs[: len(tokens)]))
