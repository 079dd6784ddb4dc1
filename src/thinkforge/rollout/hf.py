"""Batched `generate` with a KV cache on the policy itself: works on CPU and under FSDP2 (the backbone registers
`generate` as an FSDP forward method), and needs no weight sync since it *is* the policy."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from thinkforge.chat import ChatFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Rollout, prompt_token_ids, rollout_of
from thinkforge.rollout.settings import SamplingParams
from thinkforge.rollout.weight_check import read_elements


class SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the distribution `generate` samples from, one step behind.

    At step t the input ids end with the token drawn at step t-1, so only the previous step's log-softmax is
    kept ([batch, vocab]) rather than every step's scores. Custom processors run before HF's temperature and
    top-p warpers, so the same transforms are applied here to the unmodified scores.
    """

    def __init__(self, sampling: SamplingParams, on_step: Callable[[torch.Tensor], None] | None = None) -> None:
        self.temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        self.top_p = TopPLogitsWarper(sampling.top_p) if sampling.temperature > 0 and sampling.top_p < 1 else None
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids[:, -1])
        if self.on_step is not None:
            self.on_step(input_ids)
        warped = scores.float() / self.temperature
        if self.top_p is not None:
            warped = self.top_p(input_ids, warped)
        self.previous = torch.log_softmax(warped, dim=-1)
        return scores

    def _record(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def finish(self, sequences: torch.Tensor, num_new: int) -> list[list[float]]:
        """Per-row log-probs of the `num_new` generated tokens that close `sequences`."""
        self._record(sequences[:, -1])
        if not self.steps:
            return [[] for _ in range(sequences.shape[0])]
        return torch.stack(self.steps[-num_new:], dim=1).tolist()


class PreallocatedLayer(DynamicLayer):
    """A dynamic cache layer that writes each step into a buffer sized for the whole generation.

    HF's `DynamicLayer` concatenates its whole cache with every new token: generation of L tokens copies O(L²)
    cache memory, which was half the time of 512-token rollouts of a 135M model on CPU. The keys and values it
    returns are views of the same numbers, so attention sees exactly what it saw before."""

    def __init__(self, capacity: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.capacity, self.length = capacity, 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            self._key_buffer: torch.Tensor | None = None
            self._value_buffer: torch.Tensor | None = None
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or self._value_buffer is None or end > self._key_buffer.shape[-2]:
            self._grow(key_states, value_states, max(end, self.capacity))
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., self.length : end, :] = key_states
        self._value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        keys, values = key_states.new_empty(shape), value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        if self.length and self._key_buffer is not None and self._value_buffer is not None:
            keys[..., : self.length, :] = self._key_buffer[..., : self.length, :]
            values[..., : self.length, :] = self._value_buffer[..., : self.length, :]
        self._key_buffer, self._value_buffer, self.capacity = keys, values, capacity

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length, self._key_buffer, self._value_buffer = 0, None, None
        super().reset()


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A `DynamicCache` whose full-attention layers write into buffers of `capacity` positions (sliding-window
    layers keep HF's own)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, Any]:
    """Prompts' token ids as one batch, padded on the left (generation appends on the right), with their mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for position, row in enumerate(rows):
        if row:
            ids[position, width - len(row) :] = torch.tensor(row)
            mask[position, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _cache_argument(model: Any) -> str:
    """What the installed transformers calls the KV cache argument and output: `cache` (5.x), `past_key_values`."""
    hf = getattr(model, "hf", model)
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


class HFEngine:
    def __init__(
        self,
        model: Any,
        chat: ChatFormat,
        *,
        batch_size: int = 64,
        synced: bool = False,
        share_prefill: bool = True,
        stop_point: Callable[[], None] | None = None,
    ) -> None:
        """`synced=True` under FSDP: every rank keeps stepping until all are done, or the all-gathers deadlock.

        `share_prefill`: each distinct prompt of a batch is encoded once, alone (no left padding), and its KV cache
        copied to all its samples' rows before HF `generate` decodes them: a group of G samples pays one prefill,
        not G padded ones. Only with several samples per prompt (one batched prefill is faster for distinct
        prompts), and in one process only: under FSDP the ranks' prefill calls would not line up.

        A row ends at any of the chat format's end tokens; `rollout_of` cuts it and decides `finished`.
        `stop_point` is called after every decode step: where a stop asked for from outside may end the work
        (under FSDP every rank calls it at the same step)."""
        self.model, self.tokenizer, self.batch_size, self.synced = model, chat.tokenizer, batch_size, synced
        self.share_prefill, self.stop_point = share_prefill, stop_point
        self.end_ids = chat.end_ids

    holds_weights = False

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *, version: int = 0) -> None:
        """Nothing to do: generation runs on the live policy weights."""

    def read_weights(self, positions: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor | None]]:
        """The live policy's own elements (a stage's policy wraps the HF model as `hf`)."""
        return {"the engine": read_elements(getattr(self.model, "hf", self.model), positions)}

    def sleep(self) -> None:
        """Nothing to free: the engine is the policy."""

    def close(self) -> None:
        """Nothing started outside this process."""

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        tokenizer = self.tokenizer
        encoded = prompt_token_ids(tokenizer, prompts)
        jobs = [index for index in range(len(prompts)) for _ in range(sampling.num_samples)]
        rollouts: list[list[Rollout]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for start in range(0, len(jobs), self.batch_size):
                    chunk = jobs[start : start + self.batch_size]
                    inputs = left_padded([encoded[index] for index in chunk], tokenizer.pad_token_id, device)
                    capacity = inputs["input_ids"].shape[1] + sampling.max_new_tokens
                    if self.share_prefill and sampling.num_samples > 1 and not self.synced:
                        cache = self._prefilled_cache(chunk, inputs, capacity)
                    else:
                        cache = preallocated_cache(self._hf.config, capacity)
                    inputs[_cache_argument(self.model)] = cache
                    sampled = sampling.temperature > 0
                    recorder = SampledLogprobs(sampling, self._on_step(inputs["input_ids"].shape[1], progress))
                    output = self.model.generate(
                        **inputs,
                        max_new_tokens=sampling.max_new_tokens,
                        do_sample=sampled,
                        temperature=sampling.temperature if sampled else None,
                        top_p=sampling.top_p if sampled else None,
                        top_k=0 if sampled else None,
                        eos_token_id=self.end_ids,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                        synced_gpus=self.synced,
                        logits_processor=LogitsProcessorList([recorder]),
                        **(
                            {"stop_strings": list(sampling.stop_strings), "tokenizer": tokenizer}
                            if sampling.stop_strings
                            else {}
                        ),
                    )
                    new_tokens = output[:, inputs["input_ids"].shape[1] :]
                    logprobs = recorder.finish(output, new_tokens.shape[1])
                    if progress is not None:
                        progress.end_batch(len(chunk), int(self._generated(new_tokens)[0].sum()))
                    for index, row, row_logprobs in zip(chunk, new_tokens.tolist(), logprobs):
                        rollouts[index].append(
                            rollout_of(tokenizer, index, row, row_logprobs, self.end_ids, sampling.stop_strings)
                        )
        finally:
            self.model.train(was_training)
        return rollouts

    def _generated(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the tokens generated up to and including its first end token, and whether it has one."""
        ended = torch.isin(new_tokens, torch.tensor(self.end_ids, device=new_tokens.device))
        finished = ended.any(1)
        if not new_tokens.shape[1]:
            return finished.long(), finished
        return torch.where(finished, ended.int().argmax(1) + 1, new_tokens.shape[1]), finished

    def _on_step(self, prompt_width: int, progress: GenerationProgress | None) -> Callable[[torch.Tensor], None] | None:
        """After each decode step: the batch's new tokens and finished rows to the progress report, if there is
        one, and the stop point."""
        if progress is None and self.stop_point is None:
            return None
        stop_point = self.stop_point

        def on_step(input_ids: torch.Tensor) -> None:
            if progress is not None:
                lengths, finished = self._generated(input_ids[:, prompt_width:])
                progress.step(int(lengths.sum()), int(finished.sum()))
            if stop_point is not None:
                stop_point()

        return on_step

    @property
    def _hf(self) -> Any:
        return getattr(self.model, "hf", self.model)

    def _prefilled_cache(self, owners: list[int], inputs: Any, capacity: int) -> DynamicCache:
        """The KV cache of every row's prompt but its last token, left-padded like `inputs`: `generate` then starts
        from that last token. Each distinct prompt (`owners`: the prompt index of each row) runs through the decoder
        once, alone, at positions 0.. as the padded batch would place it."""
        hf = self._hf
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        width = ids.shape[1]
        rows_of: dict[int, list[int]] = {}
        for row, owner in enumerate(owners):
            rows_of.setdefault(owner, []).append(row)
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for rows in rows_of.values():
            prompt = ids[rows[0], width - int(mask[rows[0]].sum()) :]
            if len(prompt) < 2:
                continue
            encoded = hf.get_decoder()(input_ids=prompt[None, :-1], use_cache=True)
            prefix = encoded[_cache_argument(hf)]
            for layer, (keys, values) in enumerate((entry.keys, entry.values) for entry in prefix.layers):
                if len(layers) <= layer:
                    shape = (len(owners), keys.shape[1], width - 1, keys.shape[3])
                    layers.append((keys.new_zeros(shape), values.new_zeros(shape)))
                layers[layer][0][rows, :, width - len(prompt) :] = keys
                layers[layer][1][rows, :, width - len(prompt) :] = values
        cache = preallocated_cache(hf.config, capacity)
        for layer, (keys, values) in enumerate(layers):
            cache.update(keys, values, layer)
        return cache
