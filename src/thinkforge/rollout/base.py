"""The rollout interface: prompts in, completions out. `hf` samples the live policy; `vllm` keeps its own copy of
the weights, which `update_weights` replaces after the policy's optimizer steps."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # Generation of a sample also ends after any of these strings (e.g. "</think>" for budget forcing).
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")


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


class RolloutEngine(Protocol):
    #: whether the engine samples its own copy of the weights, which `update_weights` must refresh
    holds_weights: bool

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int) -> list[list[Rollout]]:
        """`num_samples` rollouts for each prompt, grouped by prompt, in prompt order."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Sample from these (HF-named, full) weights from now on."""

    def sleep(self) -> None:
        """Free what sampling holds (a KV cache) while the trainer runs; the next call wakes it."""


def end_ids_of(tokenizer: Any, generation_config: Any) -> list[int]:
    """The end tokens a row stops at: the generation config's list (`load_hf_model` fills it with the chat turn's
    end, the tokenizer's EOS and the model's own) and the tokenizer's EOS. The same set decides `finished`."""
    declared = getattr(generation_config, "eos_token_id", None)
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return list(dict.fromkeys([*declared, tokenizer.eos_token_id]))


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


class GenerationProgress:
    """A bar over the samples of a long generation job (thinkforge-eval): samples done, new tokens/s and the ETA,
    moved on after every decode step, so a 40-minute evaluation never sits silent."""

    def __init__(self, total: int, description: str = "sampling") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit="sample", dynamic_ncols=True)
        self.done, self.tokens, self.started = 0, 0, time.perf_counter()
        self.chunk_done = self.chunk_tokens = 0

    def step(self, new_tokens: int, finished: int) -> None:
        """Within the current batch: `new_tokens` generated so far, `finished` rows ended so far."""
        self.bar.n = self.done + finished
        rate = (self.tokens + new_tokens) / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} new tokens/s", refresh=False)
        self.bar.refresh()
        self.chunk_done, self.chunk_tokens = finished, new_tokens

    def end_batch(self, rows: int, new_tokens: int) -> None:
        self.done, self.tokens = self.done + rows, self.tokens + new_tokens
        self.step(0, 0)

    def close(self) -> None:
        self.bar.n = self.done
        self.bar.close()
