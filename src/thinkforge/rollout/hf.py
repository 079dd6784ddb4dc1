"""Batched `generate` with a KV cache on the policy itself: works on CPU and under FSDP2 (the backbone registers
`generate` as an FSDP forward method), and needs no weight sync since it *is* the policy."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from thinkforge.rollout.base import Rollout, SamplingConfig


class HFEngine:
    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, synced: bool = False) -> None:
        """`synced=True` under FSDP: every rank keeps stepping until all are done, or the all-gathers deadlock."""
        self.model, self.tokenizer, self.batch_size, self.synced = model, tokenizer, batch_size, synced

    def update_weights(self) -> None:
        """Nothing to do: generation runs on the live policy weights."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int) -> list[list[Rollout]]:
        tokenizer, eos_id = self.tokenizer, self.tokenizer.eos_token_id
        jobs = [(index, prompt) for index, prompt in enumerate(prompts) for _ in range(sampling.num_samples)]
        rollouts: list[list[Rollout]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for start in range(0, len(jobs), self.batch_size):
                    chunk = jobs[start : start + self.batch_size]
                    inputs = tokenizer([prompt for _, prompt in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    sampled = sampling.temperature > 0
                    output = self.model.generate(
                        **inputs,
                        max_new_tokens=sampling.max_new_tokens,
                        do_sample=sampled,
                        temperature=sampling.temperature if sampled else None,
                        top_p=sampling.top_p if sampled else None,
                        top_k=0 if sampled else None,
                        eos_token_id=eos_id,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                        synced_gpus=self.synced,
                        **({"stop_strings": list(sampling.stop_strings), "tokenizer": tokenizer} if sampling.stop_strings else {}),
                    )
                    for (index, _), row in zip(chunk, output[:, inputs["input_ids"].shape[1] :].tolist()):
                        rollouts[index].append(self._rollout(index, row, sampling.stop_strings))
        finally:
            tokenizer.padding_side = previous_side
            self.model.train(was_training)
        return rollouts

    def _rollout(self, index: int, row: list[int], stop_strings: Sequence[str]) -> Rollout:
        """Cuts a generated row after EOS, or after the first stop string (HF may stop a row later than that when
        the string straddles tokens; the rest is padding). The cut is the shortest prefix whose text holds a stop
        string, found by bisection: a few decodes per row, not one per token."""
        tokenizer, eos_id = self.tokenizer, self.tokenizer.eos_token_id
        finished = eos_id in row
        tokens = row[: row.index(eos_id) + 1] if finished else row
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
            return Rollout(index, text, tuple(tokens), False, stop)
        return Rollout(index, text.removesuffix(tokenizer.eos_token), tuple(tokens), finished)
