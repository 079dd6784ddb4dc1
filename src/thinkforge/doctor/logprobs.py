"""Sampler vs trainer log-probs: the engine that draws the stage's own samples and the training forward pass must
score the same distribution, or importance ratios and clipping refer to the wrong policy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import TokenSequence
from thinkforge.doctor.findings import Finding
from thinkforge.rollout.base import Generate, RolloutEngine
from thinkforge.rollout.engines import EngineSource, build_engine
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams, ToolsConfig
from thinkforge.rollout.tools import ToolRollouts

LOGPROB_WARN, LOGPROB_FAIL = 1e-2, 1e-1


def sampler_trainer_gap(
    model: CausalLM,
    chat: ChatFormat,
    prompts: Sequence[str],
    sampling: SamplingParams,
    *,
    score_temperature: float | None = None,
    engine: RolloutEngine | None = None,
    tools: ToolsConfig | None = None,
) -> float:
    """Mean |log p_sampler − log p_trainer| per sampled token: the engine's recorded log-probs (HF generate on
    `model` unless another engine is given) against the training forward pass at `score_temperature` (the
    sampling temperature unless told otherwise). With `tools`, the rollouts run their calls, and the model's
    tokens of every turn are compared, as the trainer scores them (the tool's tokens carry no loss).
    `prompts` are rendered already."""
    generate: Generate = (engine or HFEngine(model, chat)).generate
    if tools is not None and tools.enabled:
        generate = ToolRollouts(generate, chat, tools)
    groups = generate(prompts, sampling, seed=0)
    temperature = score_temperature or sampling.temperature
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt_ids, group in zip(chat.encode_many(prompts), groups):
            for rollout in group:
                if not rollout.token_ids:
                    continue
                ids = list(prompt_ids) + list(rollout.token_ids)
                sequence = TokenSequence.causal(ids, [False] * len(prompt_ids) + list(rollout.trainable))
                logps, _ = model(
                    torch.tensor([sequence.input_ids]), torch.tensor([sequence.labels]), temperature=temperature
                )
                trainer_side = logps[0, len(prompt_ids) - 1 : len(ids) - 1]
                sampled = torch.tensor(rollout.trainable)
                total += (trainer_side - torch.tensor(rollout.logprobs))[sampled].abs().sum().item()
                count += int(sampled.sum())
    return total / max(count, 1)


def check_logprobs(run: TrainConfig, chat: ChatFormat, sampling: SamplingParams, prompts: list[str]) -> Finding:
    model = CausalLM(load_hf_model(run.model, chat, param_dtype=torch.float32), run.model.logprob_chunk_size)

    def weights_dir() -> str:
        if run.model.name_or_path is None:
            raise ValueError("the vLLM engine loads model.name_or_path, which is not set")
        return run.model.name_or_path

    source = EngineSource(
        chat,
        model=lambda: model,
        weights_dir=weights_dir,
        max_model_len=run.stage.longest_prompt(run.data) + sampling.max_new_tokens,
        seed=0,
    )
    rendered = [chat.prompt(prompt) for prompt in prompts[:4]]
    engine = build_engine(run.rollout, source)
    gap = sampler_trainer_gap(model, chat, rendered, sampling, engine=engine, tools=run.tools)
    measured = (
        f"{run.rollout.engine} engine: mean |Δ log p| {gap:.1e} per token "
        f"at T={sampling.temperature}, top_p={sampling.top_p}"
        + (f", the model's turns with tools={run.tools.tool}" if run.tools.enabled else "")
    )
    if gap < LOGPROB_WARN:
        return Finding("sampler vs trainer log-probs", "pass", measured)
    advice = (
        "the trainer scores another distribution than the sampler drew from: importance ratios and clipping refer "
        "to the wrong policy (top_p < 1 renormalises the sampler only; use top_p=1 for RL)"
    )
    return Finding("sampler vs trainer log-probs", "warn" if gap < LOGPROB_FAIL else "fail", measured, advice)
