"""The policy's sampler: the configured engine (`rollout.*`), created on first use and kept for the stage, fed
the policy's weights whenever they moved on since it last sampled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from thinkforge.adapters import has_adapter, merged_weights, whole_tensor
from thinkforge.backbone import CausalLM
from thinkforge.chat import ChatFormat
from thinkforge.progress import GenerationProgress
from thinkforge.rollout.base import EnginePrompt, Rollout, RolloutEngine
from thinkforge.rollout.engines import EngineSource, build_engine
from thinkforge.rollout.settings import RolloutConfig, SamplingParams
from thinkforge.rollout.weight_check import PushedSample


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
    """Feeds the engine the policy's weights whenever they moved on since it last sampled, and checks that it holds
    them (`rollout/weight_check.py`: a mismatch stops the run naming the tensor). `starting_weights`: the
    directory (or hub id) of the checkpoint the policy started from, which an engine that holds its own weights
    starts from; None when the policy was built from a config, which `export()` then writes for it.
    `compute_context`: the trainer's compute dtype, for the HF engine, which runs the live policy."""

    def __init__(
        self,
        policy: CausalLM,
        chat: ChatFormat,
        rollout: RolloutConfig,
        *,
        starting_weights: str | None,
        export: Callable[[], Path],
        longest_sequence: int,
        seed: int,
        world_size: int,
        compute_context: Callable[[], Any],
        stop_point: Callable[[], None] | None = None,
    ) -> None:
        self.policy, self.chat, self.rollout = policy, chat, rollout
        self.starting_weights, self.export = starting_weights, export
        # an engine's context: the stage's longest prompt and completion, within what the model's positions allow
        positions = getattr(policy.hf.config, "max_position_embeddings", None) or longest_sequence
        self.max_model_len = min(longest_sequence, positions)
        self.seed, self.world_size = seed, world_size
        self.compute_context, self.stop_point = compute_context, stop_point
        self.engine: RolloutEngine | None = None
        self.engine_step = -1  # the optimizer step whose weights an engine that holds its own copy samples
        self.weight_sync_seconds = 0.0

    @property
    def holds_weights(self) -> bool:
        return self.rollout.engine != "hf"

    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        step: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """This rank's prompts sampled from the weights of optimizer step `step`; under FSDP every rank calls it
        together."""
        engine = self.sync(step)
        with contextlib.nullcontext() if engine.holds_weights else self.compute_context():
            groups = engine.generate(prompts, sampling, seed=seed, progress=progress)
        engine.sleep()
        return [[replace(rollout, policy_version=step) for rollout in group] for group in groups]

    def sync(self, step: int) -> RolloutEngine:
        """The engine, holding the weights of optimizer step `step`: pushed (and checked) if it holds its own copy
        and they moved on. Reads the policy's parameters: call it where nothing is training them."""
        engine = self.engine
        if engine is None:
            engine = self.start(step)
            # it loaded its own copy, of the weights of `engine_step`: when those are the ones it is about to sample
            # with (no push comes first), they must be the policy's (a server started elsewhere may hold others)
            if engine.holds_weights and self.engine_step == step:
                held = PushedSample()
                for _ in held.recording(policy_weights(self.policy)):
                    pass
                held.check_all(engine.read_weights(held.positions), self.engine_step)
        if engine.holds_weights and self.engine_step != step:
            started = time.perf_counter()
            pushed = PushedSample()
            engine.update_weights(pushed.recording(policy_weights(self.policy)), version=step)
            pushed.check_all(engine.read_weights(pushed.positions), step)
            self.weight_sync_seconds, self.engine_step = time.perf_counter() - started, step
        return engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def start(self, step: int) -> RolloutEngine:
        def weights_dir() -> str | Path:
            """The checkpoint the policy started from, or an export of the policy as it is at `step`."""
            if self.starting_weights is not None:
                self.engine_step = 0
                return self.starting_weights
            self.engine_step = step
            return self.export()

        source = EngineSource(
            self.chat,
            model=lambda: self.policy,
            weights_dir=weights_dir,
            max_model_len=self.max_model_len,
            seed=self.seed,
            synced=self.world_size > 1,
            stop_point=self.stop_point,
        )
        self.engine = build_engine(self.rollout, source)
        return self.engine
