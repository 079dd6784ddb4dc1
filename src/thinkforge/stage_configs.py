"""The stage schemas: every knob of `stage.*`, typed, with its allowed values, registered in Hydra's ConfigStore.

Each `conf/stage/*.yaml` starts from its schema (`stage_schema/<name>` in its defaults list), so a misspelt or
mistyped knob fails when the config is composed, and a value out of range fails in `validate`, before any stage
of a pipeline runs. These are the only checks of stage settings: the stages and the loss functions trust them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from thinkforge.benchmarks import EvalConfig, shared_benchmarks
from thinkforge.config import DataConfig, PipelineConfig, StageSchema, TrainConfig
from thinkforge.errors import ConfigError, one_of, require
from thinkforge.objectives import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    DPO_LOSS_TYPES,
    KL_ESTIMATORS,
    ROLLOUT_CORRECTIONS,
    SURROGATES,
    PolicyObjective,
)
from thinkforge.rewards.shaping import RewardModel
from thinkforge.rollout.settings import SamplingConfig

ANSWER_EXTRACTIONS = ("strict", "lenient")


def own_samples() -> SamplingConfig:
    """How a stage samples its starting model for its own training rows (rollout DPO, rejection-sampled SFT): 8
    completions of up to 160 tokens per prompt at temperature 1, each verified against the row's gold."""
    return SamplingConfig(num_samples=8, temperature=1.0, max_new_tokens=160)


def check_own_samples(sampling: SamplingConfig, min_samples: int) -> None:
    """Sampled once, from the starting checkpoint, before training: a schedule over steps means nothing there."""
    sampling.check("stage.sampling", min_samples=min_samples, sampled=True)
    for knob in ("temperature", "max_new_tokens"):
        require(
            isinstance(getattr(sampling, knob), (int, float)),
            f"stage.sampling.{knob}",
            "is one number here: the stage samples once, before it trains",
        )


@dataclass
class MidTrainingConfig(StageSchema):
    _target_: str = "thinkforge.stages.midtrain.MidTraining"
    # chat: prompt + completion rendered with the chat template; text: a raw `text` field.
    documents: str = "chat"

    def __post_init__(self) -> None:
        one_of(self.documents, ("chat", "text"), "stage.documents")


@dataclass
class SFTConfig(StageSchema):
    _target_: str = "thinkforge.stages.sft.SFT"
    # prompt_completion | messages
    format: str = "prompt_completion"
    # file: the replies in the data; rejection: the starting model's own verified-correct samples of prompt + gold
    # rows (DeepSeek-R1's rejection-sampled SFT), sampled once before training and kept in the run directory
    replies: str = "file"
    # rejection: how the starting model is sampled
    sampling: SamplingConfig = field(default_factory=own_samples)
    # rejection: up to how many distinct verified-correct, finished samples of each prompt become replies
    max_per_prompt: int = 1
    # how rejection samples are verified: strict (\boxed{} after </think>) or lenient (also a stated answer)
    answer_extraction: str = "strict"

    def __post_init__(self) -> None:
        one_of(self.format, ("prompt_completion", "messages"), "stage.format")
        check_own_samples(self.sampling, min_samples=1)
        require(self.max_per_prompt >= 1, "stage.max_per_prompt", f"must be positive; got {self.max_per_prompt}")
        one_of(self.replies, ("file", "rejection"), "stage.replies")
        one_of(self.answer_extraction, ANSWER_EXTRACTIONS, "stage.answer_extraction")
        require(
            self.replies == "file" or self.format == "prompt_completion",
            "stage.format",
            "rejection-sampled replies answer prompts: set stage.format=prompt_completion",
        )

    def check_data(self, data: DataConfig) -> None:
        require(data.overflow != "split", "data.overflow", "SFT conversations can be truncated or dropped, not split")

    def trains_on_answers(self) -> bool:
        return self.replies == "rejection"

    def samples_rows_before_training(self) -> str | None:
        return "rejection-sampled replies (stage.replies=rejection)" if self.replies == "rejection" else None

    def reads_stated_answers(self) -> bool:
        return self.answer_extraction == "lenient"


@dataclass
class DPOConfig(StageSchema):
    _target_: str = "thinkforge.stages.dpo.DPO"
    # the implicit reward's scale: the log-ratio margin to the reference is multiplied by beta
    beta: float = 0.1
    # sigmoid (DPO), ipo or hinge
    loss_type: str = "sigmoid"
    # sigmoid: the assumed share of flipped pairs (conservative DPO), in [0, 0.5)
    label_smoothing: float = 0.0
    # > 0 adds the chosen answer's per-token NLL (iterative RPO); 1.0 is the paper's value for reasoning pairs
    rpo_alpha: float = 0.0
    # score every pair under the reference once before training, so no reference model is held while training
    precompute_ref_logps: bool = False
    # file: prompt/chosen/rejected rows; rollout: pairs from the starting model's own verified samples
    pairs: str = "rollout"
    # rollout: how the starting model is sampled for its pairs (a pair needs at least 2 samples of a prompt)
    sampling: SamplingConfig = field(default_factory=own_samples)
    # how rollout pairs are verified: strict (\boxed{} after </think>) or lenient (also a stated answer)
    answer_extraction: str = "strict"
    # score the group's (or pair's) prompt once, each completion attending to it and to itself (SDPA only; with
    # flash-attn, or past SHARED_PROMPT_MAX_TOKENS in one span, the prompt is repeated per completion)
    share_prompt: bool = True

    def __post_init__(self) -> None:
        one_of(self.loss_type, DPO_LOSS_TYPES, "stage.loss_type")
        require(self.beta > 0, "stage.beta", f"must be positive; got {self.beta}")
        require(
            0 <= self.label_smoothing < 0.5, "stage.label_smoothing", f"must be in [0, 0.5); got {self.label_smoothing}"
        )
        require(self.rpo_alpha >= 0, "stage.rpo_alpha", f"must be >= 0; got {self.rpo_alpha}")
        one_of(self.pairs, ("file", "rollout"), "stage.pairs")
        check_own_samples(self.sampling, min_samples=2)
        one_of(self.answer_extraction, ANSWER_EXTRACTIONS, "stage.answer_extraction")

    def check_data(self, data: DataConfig) -> None:
        require(data.overflow != "split", "data.overflow", "a DPO pair's sides can be truncated or dropped, not split")
        require(
            not data.group_by_length, "data.group_by_length", "groups midtrain and SFT rows; DPO pairs are not grouped"
        )

    def trains_on_answers(self) -> bool:
        return self.pairs == "rollout"

    def samples_rows_before_training(self) -> str | None:
        return "rollout DPO's pairs (stage.pairs=rollout)" if self.pairs == "rollout" else None

    def uses_reference(self) -> bool:
        return not self.precompute_ref_logps

    def reads_stated_answers(self) -> bool:
        return self.answer_extraction == "lenient"


def rollouts() -> SamplingConfig:
    """GRPO's default sampling: groups of 8 completions of up to 96 tokens at temperature 1."""
    return SamplingConfig(num_samples=8, temperature=1.0, max_new_tokens=96)


@dataclass
class GRPOConfig(StageSchema):
    _target_: str = "thinkforge.stages.grpo.GRPO"
    # how each prompt's group is sampled: num_samples is the group size (advantages compare a group's completions
    # with each other); temperature and max_new_tokens may be schedules {from_step: value}: an annealed temperature,
    # iterative context lengthening ({0: 8192, 500: 16384})
    sampling: SamplingConfig = field(default_factory=rollouts)
    # optimizer steps on each batch of rollouts (> 1: the ratio and clipping come into play)
    num_iterations: int = 1
    # the objective's surrogate (thinkforge.objectives.PolicyObjective): clip (PPO's clipped token ratio), gspo (the
    # clipped ratio of the whole sequence; the paper clips it at 3e-4/4e-4) or cispo (MiniMax-M1's clipped
    # importance weight, detached, times log pi: every token keeps a gradient)
    surrogate: str = "clip"
    # how its token losses are averaged: token_mean (DAPO), sequence_mean (DeepSeek-R1's GRPO) or constant (Dr.
    # GRPO: the sum over B x max completion length)
    aggregation: str = "token_mean"
    # advantages divided by the group's std, the batch's std, or nothing (Dr. GRPO)
    advantage_scale: str = "group"
    # the clip range [1 - epsilon_low, 1 + epsilon_high]
    epsilon_low: float = 0.2
    # the upper side, raised by DAPO's clip-higher (0.28 against 0.2) so unlikely tokens can gain
    epsilon_high: float = 0.28
    # INTELLECT-2's two-sided clip: the ratio of a negative-advantage token is capped at delta (> 1 + epsilon_high;
    # a dual-clip constant c does the same); null: off
    delta: Optional[float] = None
    # train only the top-entropy share of each step's completion tokens (the "80/20" rule: 0.2); 1.0: all tokens
    top_entropy_quantile: float = 1.0
    # KL to the frozen starting checkpoint; 0 loads no reference model
    beta: float = 0.0
    # its estimator per token: k1 = log(pi/ref), k2 = (log ratio)^2 / 2, k3 = ratio - log ratio - 1 (low variance)
    kl_estimator: str = "k3"
    # prompts longer than this (rendered, in tokens) are dropped, with a count in the log
    max_prompt_length: int = 512
    # truncated completions train on nothing (DAPO's overlong filtering)
    mask_truncated: bool = False
    # drop groups whose rewards are all equal and sample more prompts, up to max_refills times per step (DAPO)
    dynamic_sampling: bool = True
    # dynamic sampling's extra rounds of prompts per step, at most
    max_refills: int = 2
    # reward function -> {weight, options}; see conf/reward/. null: RewardModel.DEFAULT (math accuracy alone)
    reward: Optional[dict[str, Any]] = None
    # strict: the answer is the \boxed{} after </think>; lenient: also a stated "The answer is: 25" / "#### 25" (for
    # instruct models that never box; hedges still score 0)
    answer_extraction: str = "strict"
    # stop with an error after this many steps in a row in which no group had a reward spread (0: never)
    max_steps_without_signal: int = 10
    # truncated importance sampling of the trainer's policy over the sampler's (another engine's kernels, bf16):
    # none | token_truncate | token_mask | sequence_truncate | sequence_mask, with weights capped at / masked past
    # rollout_correction_cap
    rollout_correction: str = "none"
    # the importance weight's cap (truncate) or threshold (mask)
    rollout_correction_cap: float = 2.0
    # rollouts may come from the weights of up to this many batches of rollouts earlier (optimizer steps, with
    # num_iterations=1; 0: on-policy): each step samples ahead the rollouts of the batches up to max_staleness later
    # (thinkforge.rollout.ahead; on rollout=vllm_server, while it trains); the loss weighs them by the trainer's over
    # the sampler's probability, as stage.rollout_correction says (AReaL's decoupled PPO), so it must not be none
    max_staleness: int = 0
    # score the group's (or pair's) prompt once, each completion attending to it and to itself (SDPA only; with
    # flash-attn, or past SHARED_PROMPT_MAX_TOKENS in one span, the prompt is repeated per completion)
    share_prompt: bool = True

    def __post_init__(self) -> None:
        self.sampling.check("stage.sampling", min_samples=2, sampled=True)
        require(self.sampling.max_new_tokens is not None, "stage.sampling.max_new_tokens", "is required")
        one_of(self.surrogate, SURROGATES, "stage.surrogate")
        one_of(self.aggregation, AGGREGATIONS, "stage.aggregation")
        one_of(self.advantage_scale, ADVANTAGE_SCALES, "stage.advantage_scale")
        one_of(self.kl_estimator, KL_ESTIMATORS, "stage.kl_estimator")
        require(
            0 < self.top_entropy_quantile <= 1,
            "stage.top_entropy_quantile",
            f"the share of tokens trained must be in (0, 1] (1.0: all); got {self.top_entropy_quantile}",
        )
        require(
            self.delta is None or self.delta > 1 + self.epsilon_high,
            "stage.delta",
            f"caps a ratio above the clip range, so it must exceed 1 + epsilon_high = {1 + self.epsilon_high}; "
            f"got {self.delta}",
        )
        require(
            self.delta is None or self.surrogate != "cispo",
            "stage.delta",
            "clips the PPO-style surrogate; cispo clips its importance weight with epsilon_low/epsilon_high alone",
        )
        require(
            self.max_prompt_length > 0, "stage.max_prompt_length", f"must be positive; got {self.max_prompt_length}"
        )
        require(self.num_iterations >= 1, "stage.num_iterations", f"must be >= 1; got {self.num_iterations}")
        require(self.max_refills >= 0, "stage.max_refills", f"must be >= 0; got {self.max_refills}")
        require(
            self.epsilon_low >= 0 and self.epsilon_high >= 0,
            "stage.epsilon_low/epsilon_high",
            "clip ranges must be >= 0",
        )
        require(self.beta >= 0, "stage.beta", f"must be >= 0 (0 switches the KL term off); got {self.beta}")
        one_of(self.answer_extraction, ANSWER_EXTRACTIONS, "stage.answer_extraction")
        one_of(self.rollout_correction, ROLLOUT_CORRECTIONS, "stage.rollout_correction")
        require(
            self.rollout_correction_cap >= 1,
            "stage.rollout_correction_cap",
            f"must be >= 1; got {self.rollout_correction_cap}",
        )
        require(self.max_steps_without_signal >= 0, "stage.max_steps_without_signal", "must be >= 0 (0: never stop)")
        require(
            self.max_staleness >= 0, "stage.max_staleness", f"must be >= 0 (0: on-policy); got {self.max_staleness}"
        )
        require(
            not self.max_staleness or self.rollout_correction != "none",
            "stage.rollout_correction",
            f"is none, but stage.max_staleness={self.max_staleness} trains on rollouts of older weights: weigh them "
            "by the trainer's over the sampler's probability (token_truncate, as AReaL's decoupled PPO)",
        )
        try:
            RewardModel(self.reward)  # building it checks names and options
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def objective(self) -> PolicyObjective:
        """The knobs the policy loss takes, as the one object it takes them in."""
        return PolicyObjective(
            surrogate=self.surrogate,
            aggregation=self.aggregation,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
        )

    def check_data(self, data: DataConfig) -> None:
        require(
            not data.group_by_length,
            "data.group_by_length",
            "groups midtrain and SFT rows; GRPO's prompts are not grouped",
        )

    def trains_on_answers(self) -> bool:
        return True

    def longest_prompt(self, data: DataConfig) -> int:
        return self.max_prompt_length

    def uses_reference(self) -> bool:
        return self.beta > 0

    def reads_stated_answers(self) -> bool:
        return self.answer_extraction == "lenient"


STAGE_SCHEMAS = {"midtrain": MidTrainingConfig, "sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}


def register_configs() -> None:
    """Every schema: the three entry points', each stage's (group `stage_schema`), and the shared benchmarks
    (group `benchmark`, beside conf/benchmark/'s demo and synthetic)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="pipeline_schema", node=PipelineConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for name, schema in STAGE_SCHEMAS.items():
        store.store(group="stage_schema", name=name, node=schema)
    for name, benchmark in shared_benchmarks().items():
        store.store(group="benchmark", name=name, node=benchmark)
