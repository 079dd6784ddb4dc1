"""The rollout interface: prompts in, completions out. `hf` samples the live policy; `vllm` keeps its own copy of
the weights, which `update_weights` replaces after the policy's optimizer steps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from thinkforge.progress import GenerationProgress
from thinkforge.rollout.settings import SamplingParams


@dataclass(frozen=True)
class Rollout:
    prompt_index: int
    text: str
    token_ids: tuple[int, ...]
    # Ended with EOS within max_new_tokens; False means truncated or stopped by a stop string.
    finished: bool
    # The stop string that ended it, if one did.
    stopped_by: str | None = None
    # log p(token) of each completion token under the distribution it was sampled from (logits / T, top-p
    # renormalised): what the trainer's recomputed log-probs must match.
    logprobs: tuple[float, ...] = ()


class Generate(Protocol):
    """What samples a rank's prompts: an engine's `generate` bound to its weights, or a stage's (policy, seed and
    progress wired in); GRPO's groups and the held-out scores take either."""

    def __call__(
        self,
        prompts: Sequence[str],
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
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """`num_samples` rollouts for each prompt, grouped by prompt, in prompt order; the same seed gives the
        same rollouts whatever else is in the batch. `progress` hears of the samples as they finish."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Sample from these (HF-named, full) weights from now on."""

    def sleep(self) -> None:
        """Free what sampling holds (a KV cache) while the trainer runs; the next call wakes it."""


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
