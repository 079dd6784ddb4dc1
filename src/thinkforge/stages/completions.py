"""Scored completions (DPO's pair sides, GRPO's group samples) laid out for one forward pass and read back out.

A prompt's completions share the prompt where the attention backend takes a custom mask (SDPA) and the span
stays small enough for a dense one; they are packed into rows (`data.pack`) or one per row, padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch

from thinkforge.backbone import CausalLM
from thinkforge.data.packing import (
    Document,
    Trainable,
    collate_documents,
    completion_documents,
    document_rows,
    unpack,
)

Batch = dict[str, torch.Tensor]

# a prompt-shared span needs a dense [tokens, tokens] attention mask; past this many tokens it repeats the prompt
SHARED_PROMPT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class CompletionBatcher:
    """How this run lays completions out: `masks_attention` (SDPA takes a prompt-sharing mask), `pack`
    (data.pack), `flatten` (flash-attn takes packed rows as one padding-free row)."""

    pad_token_id: int
    masks_attention: bool
    pack: bool
    flatten: bool

    @classmethod
    def for_attention(cls, pad_token_id: int, attention: str, *, pack: bool) -> CompletionBatcher:
        """SDPA is the one backend that takes a custom attention mask; flash-attn takes packed rows flat."""
        return cls(pad_token_id, attention == "sdpa", pack, attention == "flash_attention_2")

    def layout(
        self, prompt_ids: Sequence[int], completions: Sequence[tuple[int, Sequence[int], Trainable]], share_prompt: bool
    ) -> list[Document]:
        """One prompt's completions (member, token ids, trainable) as documents."""
        if share_prompt and self.masks_attention and len(completions) > 1:
            shared = completion_documents(prompt_ids, completions, share_prompt=True)
            if len(shared[0]) <= SHARED_PROMPT_MAX_TOKENS:
                return shared
        return completion_documents(prompt_ids, completions, share_prompt=False)

    def collate(self, documents: Sequence[Document], capacity: int) -> Batch:
        """The documents in rows of `capacity` tokens: packed (`data.pack`), else one per row, padded."""
        rows = document_rows(documents, capacity, pack=self.pack)
        return collate_documents(rows, self.pad_token_id, capacity=capacity, flatten=self.flatten and self.pack)


@overload
def completion_scores(
    model: CausalLM, batch: Batch, *, with_entropy: Literal[True], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def completion_scores(
    model: CausalLM, batch: Batch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]: ...
def completion_scores(
    model: CausalLM, batch: Batch, *, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of the batch's completions, [completions, longest], 0 past each end:
    one forward over the packed rows, read back out through `unpack_index`."""
    logprobs, entropy = model(
        batch["input_ids"],
        batch["labels"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        with_entropy=with_entropy,
        temperature=temperature,
    )
    index = batch["unpack_index"]
    return unpack(logprobs, index), None if entropy is None else unpack(entropy, index)
