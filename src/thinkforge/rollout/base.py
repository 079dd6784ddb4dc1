"""The rollout interface: prompts in, completions out. `hf` runs in-process; a `vllm` engine would implement the
same two methods (and sync weights in `update_weights` after each optimizer step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


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
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int) -> list[list[Rollout]]:
        """`num_samples` rollouts for each prompt, grouped by prompt, in prompt order."""

    def update_weights(self) -> None:
        """Make the engine sample from the policy's current weights."""
