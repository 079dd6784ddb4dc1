"""The policy's sampler: the configured engine (`rollout.*`), created on first use and kept for the stage, fed
the policy's weights whenever they moved on since it last sampled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from thinkforge.adapters import has_adapter, merged_weights, whole_tensor
from thinkforge.backbone import CausalLM
from thinkforge.config import TrainConfig
from thinkforge.rollout.base import Rollout, RolloutEngine, SamplingConfig
from thinkforge.rollout.hf import HFEngine


def policy_weights(policy: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's parameters under their HF names, full: under FSDP each is gathered as the reader asks for it,
    so the whole model never sits unsharded in memory at once (and every rank gathers in the same order). A tied
    parameter comes under each of its names: vLLM on CPU packs the LM head's copy of the embedding apart, and
    keeps the stale one unless `lm_head.weight` arrives too. A LoRA adapter comes merged into its base weights."""
    if has_adapter(policy.hf):
        yield from merged_weights(policy.hf, whole_tensor)
        return
    for name, parameter in policy.hf.named_parameters(remove_duplicate=False):
        yield name, whole_tensor(parameter).detach()


class PolicySampler:
    """`compute_context`: the trainer's compute dtype for the HF engine, which runs the live policy. `export`
    writes the policy as an HF directory, vLLM's source when the policy was built from a config."""

    def __init__(
        self,
        policy: CausalLM,
        tokenizer: Any,
        run: TrainConfig,
        rank: int,
        world_size: int,
        longest_sequence: int,
        compute_context: Callable[[], Any],
        export: Callable[[Path], None],
    ) -> None:
        self.policy, self.tokenizer, self.run = policy, tokenizer, run
        # vLLM's context: the stage's longest prompt and completion, within what the model's positions allow
        positions = getattr(policy.hf.config, "max_position_embeddings", None) or longest_sequence
        self.rank, self.world_size, self.max_model_len = rank, world_size, min(longest_sequence, positions)
        self.compute_context, self.export = compute_context, export
        self.engine: RolloutEngine | None = None
        self.engine_step = -1  # the optimizer step whose weights an engine that holds its own copy samples
        self.weight_sync_seconds = 0.0

    @property
    def holds_weights(self) -> bool:
        return self.run.rollout.engine != "hf"

    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int, step: int
    ) -> list[list[Rollout]]:
        """This rank's prompts sampled from the weights of optimizer step `step`; under FSDP every rank calls it
        together."""
        engine = self.engine or self.start(step)
        if engine.holds_weights and self.engine_step != step:
            started = time.perf_counter()
            engine.update_weights(policy_weights(self.policy))
            self.weight_sync_seconds, self.engine_step = time.perf_counter() - started, step
        with contextlib.nullcontext() if engine.holds_weights else self.compute_context():
            groups = engine.generate(prompts, sampling, seed=seed)
        engine.sleep()
        return groups

    def start(self, step: int) -> RolloutEngine:
        if self.run.rollout.engine == "hf":
            self.engine = HFEngine(
                self.policy, self.tokenizer, batch_size=self.run.heldout.batch_size, synced=self.world_size > 1
            )
        else:
            self.engine = self.vllm_engine(step)
        return self.engine

    def vllm_engine(self, step: int) -> RolloutEngine:
        """vLLM serving the starting checkpoint's directory (or hub id), or an export of the policy when it was
        built from a config."""
        from thinkforge.rollout.vllm import VLLMEngine

        source: str | Path | None = self.run.model.name_or_path
        self.engine_step = 0
        if source is None:
            source = Path(self.run.output_dir) / "rollout_model"
            self.export(source)
            self.engine_step = step
        return VLLMEngine(
            source, self.tokenizer, self.run.rollout, max_model_len=self.max_model_len, seed=self.run.seed + self.rank
        )
