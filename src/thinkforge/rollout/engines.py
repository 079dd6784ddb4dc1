"""Every rollout engine, built in one place from its own settings (`rollout.<engine>.*`), by name: the policy's
sampler in training, `thinkforge-eval`, `thinkforge-data`'s sampling commands and the doctor all build theirs here,
so each of them takes `rollout=vllm`. A new engine is one builder in `ENGINES`, its settings class in
`rollout/settings.py` and a `conf/rollout/<name>.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkforge.chat import ChatFormat
from thinkforge.rollout.base import RolloutEngine
from thinkforge.rollout.settings import HFEngineConfig, RolloutConfig, VLLMEngineConfig, VLLMServerConfig


@dataclass
class EngineSource:
    """What an engine samples, asked for only by the engines that need it: `model()`, the model to run in this
    process (the live policy, or one loaded for sampling); `weights_dir()`, an HF directory (or hub id) of the same
    weights, for engines that load their own copy."""

    chat: ChatFormat
    model: Callable[[], Any]
    weights_dir: Callable[[], str | Path]
    #: the longest prompt plus completion the engine must serve
    max_model_len: int
    seed: int
    #: several ranks sample together (FSDP): every rank steps until all are done
    synced: bool = False
    #: called at every point where a stop asked for from outside may end the sampling
    stop_point: Callable[[], None] | None = None


def build_hf(settings: HFEngineConfig, source: EngineSource) -> RolloutEngine:
    from thinkforge.rollout.hf import HFEngine

    return HFEngine(
        source.model(),
        source.chat,
        batch_size=settings.batch_size,
        synced=source.synced,
        stop_point=source.stop_point,
    )


def build_vllm(settings: VLLMEngineConfig, source: EngineSource) -> RolloutEngine:
    from thinkforge.rollout.vllm import VLLMEngine

    return VLLMEngine(source.weights_dir(), source.chat, settings, max_model_len=source.max_model_len, seed=source.seed)


def build_vllm_server(settings: VLLMServerConfig, source: EngineSource) -> RolloutEngine:
    from thinkforge.rollout.vllm_server import VLLMServerEngine

    return VLLMServerEngine(
        source.weights_dir(),
        source.chat,
        settings,
        max_model_len=source.max_model_len,
        seed=source.seed,
        synced=source.synced,
    )


ENGINES: dict[str, Callable[[Any, EngineSource], RolloutEngine]] = {
    "hf": build_hf,
    "vllm": build_vllm,
    "vllm_server": build_vllm_server,
}


def build_engine(rollout: RolloutConfig, source: EngineSource) -> RolloutEngine:
    """The engine `rollout.engine` names, on its own settings."""
    return ENGINES[rollout.engine](rollout.settings, source)
