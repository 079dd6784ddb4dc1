"""GRPO with verifiable rewards (DeepSeek-R1), with the DAPO / Dr. GRPO / DeepScaleR / Phi-4-reasoning-plus knobs.

Each training step: take this rank's prompts, sample `group_size` completions each with the live policy, score
them, compute group advantages, optionally drop zero-variance groups and refill (dynamic sampling), then run
`num_iterations` optimizer steps on the clipped surrogate with the log-probs of the sampling policy stored.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from thinkforge.chat import ChatFormat
from thinkforge.collectives import Collectives
from thinkforge.config import TrainConfig
from thinkforge.data.loader import StepBatches
from thinkforge.data.packing import IGNORE_INDEX
from thinkforge.data.records import GOLD, DataError, load_split
from thinkforge.errors import UserError
from thinkforge.losses import (
    LossSum,
    entropy_threshold,
    group_advantages,
    high_entropy_mask,
    is_extreme,
    loss_units,
    policy_loss_sum,
    rollout_correction,
)
from thinkforge.resume import data_position
from thinkforge.rewards.grading import gold_is_usable
from thinkforge.rewards.shaping import RewardModel
from thinkforge.rollout.ahead import RolloutsAhead, SampledBatch
from thinkforge.rollout.base import Rollout
from thinkforge.rollout.groups import Group, GroupSampler, Prompt, no_signal_cause
from thinkforge.rollout.settings import SamplingParams
from thinkforge.rollout.tools import tool_call_reward
from thinkforge.stage_configs import GRPOConfig
from thinkforge.stages.base import BACKGROUND_COLLECTIVES, WEIGHTS_STEP, Stage
from thinkforge.stages.completions import Batch, completion_scores
from thinkforge.stages.heldout import describe_scores
from thinkforge.stages.probe import StageProbe, TrainingExample, capped, formatted_answer
from thinkforge.stages.watch import EntropyCollapseWatch

log = logging.getLogger(__name__)

#: the starting checkpoint's held-out scores, in the run directory
START_SCORES = "heldout_start.json"


class GRPOProbe(StageProbe["GRPO"]):
    """GRPO trains on its rollouts, whose end token the engine keeps; what can drift is the prompt, so a formatted
    reply to it stands in. Each rank samples its own prompts' rollouts."""

    samples_per_rank = True

    def examples(self, count: int) -> list[TrainingExample]:
        return [self.reply_example(prompt, formatted_answer(gold)) for prompt, gold in self.gold_rows(count)]

    def sampling(self) -> SamplingParams | None:
        return capped(self.stage.sampling())


class GRPO(Stage):
    # with mask_truncated, a step whose rollouts were all truncated trains on nothing; it still counts as a step,
    # or the data position (and so the rollouts' seed) would never move on
    allows_empty_steps = True
    headline_metrics = (("loss", "loss"), ("reward/mean", "reward"), ("reward/accuracy", "accuracy"))
    default_heldout_points = 4

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__(run, chat)
        self.settings: GRPOConfig = run.stage
        self.objective = self.settings.objective()
        self.group_size = self.settings.sampling.num_samples
        self.reward_model = RewardModel(self.settings.reward, lenient=self.settings.answer_extraction == "lenient")
        self.steps_without_signal = 0
        self.collapse_watch = EntropyCollapseWatch()
        self.steps_per_batch = self.settings.num_iterations
        self.validates = False  # held-out scores instead: greedy samples graded, not a loss
        self._groups: GroupSampler | None = None
        self._step_batches: StepBatches[Batch] | None = None
        self._background_group: dist.ProcessGroup | None = None
        # on a server, rollouts sampled ahead overlap the training steps (in the colocated engines they share its
        # devices, and the HF engine samples the very weights being trained)
        overlaps = self.settings.max_staleness >= 1 and run.rollout.engine == "vllm_server"
        self.rollouts_ahead = RolloutsAhead(
            self.settings.max_staleness,
            self.sample_position,
            start_in_background=self.start_sampling_in_background if overlaps else None,
            final_position=run.trainer.max_steps // self.steps_per_batch - 1,
        )
        self.step_sampling = self.sampling()  # this step's (set as each step starts): its loss uses its temperature

    # ---- data -------------------------------------------------------------------------------------------------

    def build_items(self, split: str) -> Sequence[Prompt]:
        data = self.run.data
        records = load_split(data, "train", required=("prompt", GOLD))
        training = self.heldout.training_rows(records)
        rows = [record for record in training if gold_is_usable(record[GOLD])]
        log.info(
            "train prompts: %s; %d skipped: gold answer not parseable", records.summary(), len(training) - len(rows)
        )
        if not rows:
            raise DataError(f"{data.train}: no prompt has a gold answer the verifier can parse, or tests")
        rendered = [self.chat.prompt(record["prompt"]) for record in rows]
        encoded = self.chat.encode_many(rendered)
        longest = self.settings.max_prompt_length
        fitting = [(text, ids, row) for text, ids, row in zip(rendered, encoded, rows) if len(ids) <= longest]
        if len(fitting) < len(rows):
            log.info(
                "%d prompts longer than stage.max_prompt_length (%d tokens) dropped", len(rows) - len(fitting), longest
            )
        if not fitting:
            raise DataError(f"{data.train}: every prompt is longer than stage.max_prompt_length ({longest} tokens)")
        return [Prompt(i, text, tuple(ids), row[GOLD]) for i, (text, ids, row) in enumerate(fitting)]

    def collate(self, items: Sequence[Prompt]) -> Batch:
        return {"prompt_index": torch.tensor([item.index for item in items])}

    def probe(self) -> GRPOProbe:
        return GRPOProbe(self)

    def completion_length(self) -> int:
        """The token budget of the last step's rollouts."""
        return self.settings.sampling.at(self.run.trainer.max_steps // self.steps_per_batch - 1).max_new_tokens

    def on_train_start(self) -> None:
        """The starting checkpoint's held-out scores, once per run: kept in `heldout_start.json`, so a run stopped
        before its first checkpoint does not pay for them again."""
        super().on_train_start()
        if not self.heldout.enabled() or self.initial_heldout:
            return
        saved = Path(self.run.output_dir) / START_SCORES
        if saved.exists():
            scores = json.loads(saved.read_text())
            self.initial_heldout = {name: value for name, value in scores.items() if isinstance(value, (int, float))}
            log.info("starting held-out scores read back from %s", saved)
        else:
            self.initial_heldout = self.evaluate_heldout(filename=START_SCORES)
            if self.trainer.is_global_zero:
                log.info("held-out at the start: %s", describe_scores(self.initial_heldout))
        self.heldout.log_outside_steps(self.trainer, self.initial_heldout, "heldout_start/")

    # ---- one step: sample, score, optimise --------------------------------------------------------------------
    def sampling(self) -> SamplingParams:
        """This step's: `stage.sampling` at the current data position (its schedules move with it)."""
        return self.settings.sampling.at(data_position(self.global_step, self.steps_per_batch))

    def training_step(self, micro_batches: list[Batch], batch_idx: int) -> None:
        """The step's rollouts (`sample_position`'s, here or up to `max_staleness` steps ago) are trained on; the
        loader's `micro_batches` are the same prompts, which `sample_position` reads by position."""
        started = time.perf_counter()
        position = data_position(self.global_step, self.steps_per_batch)
        sampled, generation_seconds = self.rollouts_ahead.take(position)
        groups, stats, sampling = sampled.groups, sampled.stats, sampled.sampling
        self.step_sampling = sampling
        steps_without_signal = self.check_signal(groups, stats, sampling)
        if self.settings.max_staleness:
            stats = {**stats, **self.staleness_stats(groups)}
        train_batches = self.training_batches(groups, sampling)
        training_started = time.perf_counter()
        step = self.global_step
        for iteration in range(self.settings.num_iterations):
            # every iteration keeps its own metrics: the first under train/, later ones under train/iteration_<k>/
            prefix = "train/" if iteration == 0 else f"train/iteration_{iteration}/"
            metrics = self.optimization_step(train_batches, stats if iteration == 0 else None, prefix=prefix)
            if iteration == 0 and "entropy" in metrics:  # a step with nothing to train on has no entropy
                collapse = self.collapse_watch.update(step, metrics["entropy"], stats["reward/mean"])
                if collapse and self.trainer.is_global_zero:
                    log.warning(collapse)
        stats_time = {
            # the trainer's wait for its rollouts, and the time it took to sample them (in the background, if so)
            "generation_s": generation_seconds,
            "sampling_s": sampled.seconds,
            "training_s": time.perf_counter() - training_started,
        }
        if self.sampler is not None and self.sampler.holds_weights:
            stats_time["weight_sync_s"] = self.sampler.weight_sync_seconds
        if self.tool_rollouts is not None:
            tool_seconds = self.tool_rollouts.tool_seconds
            stats_time["tools/time_s"] = tool_seconds
            stats_time["tools/time_share"] = tool_seconds / max(time.perf_counter() - started, 1e-9)
        self.log_dict({f"train/{k}": v for k, v in stats_time.items()}, rank_zero_only=True)
        # kept only once the step is done: a run stopped inside it resumes counting from the step before
        self.steps_without_signal = steps_without_signal
        self.rollouts_ahead.done(position)

    def sample_position(self, position: int) -> SampledBatch:
        """This rank's scored groups of data `position`, sampled with the current weights and the position's own
        seed and sampling settings (its schedules move with the data, not with when it is sampled)."""
        started = time.perf_counter()
        if self._step_batches is None:
            self._step_batches = self.loaded_data.step_batches()
        items = self.loaded_data.train_items
        prompts = [items[int(i)] for batch in self._step_batches.rank_batch(position) for i in batch["prompt_index"]]
        sampling = self.settings.sampling.at(position)
        seed = self.run.seed * 7919 + position * 104729 + self.global_rank
        if self.tool_rollouts is not None:
            self.tool_rollouts.start_step()
        groups, stats = self.group_sampler(len(prompts)).sample(
            prompts, sampling, seed=seed, position=position, collectives=self.collectives
        )
        return SampledBatch(position, groups, stats, sampling, time.perf_counter() - started)

    def start_sampling_in_background(self) -> Callable[[int], SampledBatch]:
        """Pushes the current weights to the engine here, in the trainer's thread, and returns `sample_position`
        pinned to them, for the background thread (under FSDP with collectives of its own)."""
        step = self.global_step
        self.policy_sampler().sync(step)
        context = contextvars.copy_context()
        context.run(WEIGHTS_STEP.set, step)
        if self.trainer.world_size > 1:
            if self._background_group is None:  # every rank gets here at the same step: a collective call
                self._background_group = dist.new_group(backend="gloo")
            collectives = Collectives(
                self.global_rank, self.trainer.world_size, torch.device("cpu"), self._background_group
            )
            context.run(BACKGROUND_COLLECTIVES.set, collectives)
        return lambda position: context.run(self.sample_position, position)

    def evaluate_heldout(self, filename: str | None = "heldout.json", *, with_pass_k: bool = True) -> dict[str, float]:
        """After the sampling in the background, if one runs: the held-out samples use the engine too."""
        self.rollouts_ahead.settle()
        return super().evaluate_heldout(filename, with_pass_k=with_pass_k)

    def staleness_stats(self, groups: list[Group]) -> dict[str, float]:
        """Optimizer steps between the weights that sampled each rollout and the ones it trains: mean, max, and
        the share of rollouts at each age, over every rank's rollouts."""
        ages = [self.global_step - rollout.policy_version for group in groups for rollout in group.rollouts]
        limit = self.settings.max_staleness * self.steps_per_batch
        counts = {f"staleness/share_{k}": float(sum(age == k for age in ages)) for k in range(limit + 1)}
        totals = self.collectives.sums({"ages": float(sum(ages)), "samples": float(len(ages)), **counts})
        oldest = self.collectives.extremes({"staleness/max": float(max(ages))})
        samples = totals.pop("samples")
        return {
            "staleness/mean": totals.pop("ages") / samples,
            **oldest,
            **{name: count / samples for name, count in totals.items()},
        }

    # ---- resume: the rollouts sampled ahead live beside the checkpoint ---------------------------------------
    def ahead_directory(self) -> Path:
        return Path(self.run.output_dir) / "rollouts_ahead"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts_ahead.save(self.ahead_directory(), int(checkpoint["global_step"]), self.global_rank)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts_ahead.load(self.ahead_directory(), int(checkpoint["global_step"]), self.global_rank)

    def on_heldout_point(self, step: int, metrics: dict[str, float]) -> None:
        collapse = self.collapse_watch.heldout_point(step, metrics["accuracy"])
        if collapse and self.trainer.is_global_zero:
            log.warning(collapse)

    def check_signal(self, groups: list[Group], stats: dict[str, float], sampling: SamplingParams) -> int:
        """A step whose groups all have zero reward spread has zero advantages: it trains on nothing. Say so, with
        the likely cause, and stop after `max_steps_without_signal` such steps in a row instead of running on.
        Returns the count of such steps in a row, this one included."""
        if self.collectives.sum(sum(group.has_signal for group in groups)).item() > 0:
            return 0
        steps_without_signal = self.steps_without_signal + 1
        accuracy, answered = stats["reward/accuracy"], stats["reward/answered"]
        truncated = stats["completion/truncation_rate"]
        what, cause = no_signal_cause(accuracy, answered, truncated, sampling.max_new_tokens)
        message = (
            f"step {self.global_step}: no group has a reward spread, so this step trains on nothing: {what} "
            f"(accuracy {accuracy:.0%}; {1 - answered:.0%} of completions had no answer the grader could read, "
            f"{truncated:.0%} were truncated). Likely cause: {cause}"
        )
        limit = self.settings.max_steps_without_signal
        if limit and steps_without_signal >= limit:
            raise UserError(
                f"{limit} steps in a row trained on nothing (stage.max_steps_without_signal={limit}); {message}"
            )
        if self.trainer.is_global_zero:
            log.warning(message)
        return steps_without_signal

    def group_sampler(self, prompts_per_rank: int) -> GroupSampler:
        """Built on the first step, once the training prompts and this rank's share of a step are known; dynamic
        sampling draws its extra prompts from a second seeded stream over the training prompts."""
        if self._groups is None:
            refills = None
            if self.settings.dynamic_sampling:
                refills = StepBatches(
                    self.loaded_data.train_items,
                    batch_size=prompts_per_rank * self.trainer.world_size,
                    micro_batch_size=prompts_per_rank,
                    collate=list,
                    seed=self.run.data.seed + 1,
                    rank=self.global_rank,
                    world_size=self.trainer.world_size,
                    start_step=0,
                )
            tools = self.run.tools
            self._groups = GroupSampler(
                self.generate,
                self.reward_model,
                self.group_size,
                refills,
                self.settings.max_refills,
                tool_reward=(lambda rollout: tool_call_reward(rollout, tools)) if tools.enabled else None,
            )
        return self._groups

    def training_batches(self, groups: list[Group], sampling: SamplingParams) -> list[Batch]:
        """Micro-batches of `data.micro_batch_size` prompts' completions, each packed with its prompt into rows,
        with their advantages, the sampler's log-probs, and old and reference log-probs, all at the sampling
        temperature of this step. Packing stays inside a micro-batch so that every rank runs as many micro-batches
        as the others (FSDP gathers each layer once per micro-batch on all ranks together).
        """
        rewards = torch.cat([g.rewards for g in groups])
        advantages = group_advantages(
            rewards,
            self.group_size,
            self.settings.advantage_scale,
            batch_std=self.collectives.std(rewards) if self.settings.advantage_scale == "batch" else None,
        )
        rollouts = [rollout for group in groups for rollout in group.rollouts]
        batches = []
        for first in range(0, len(groups), self.run.data.micro_batch_size):
            documents = []
            for index, group in enumerate(groups[first : first + self.run.data.micro_batch_size], start=first):
                completions = [
                    (
                        index * self.group_size + k,
                        rollout.token_ids,
                        rollout.trainable if not (self.settings.mask_truncated and not rollout.finished) else False,
                    )
                    for k, rollout in enumerate(group.rollouts)
                ]
                documents += self.batcher.layout(group.prompt.token_ids, completions, self.settings.share_prompt)
            batch = self.batcher.collate(documents, max(len(document) for document in documents))
            members = batch["members"]
            batch["sampler_logps"] = self._sampler_logps(
                [rollouts[m] for m in members.tolist()], batch["targets"].shape
            )
            batch["advantages"] = advantages[members]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                if self.settings.num_iterations > 1 or self.trains_top_entropy():
                    old_logps, entropy = completion_scores(
                        self.policy, batch, with_entropy=self.trains_top_entropy(), temperature=sampling.temperature
                    )
                    if self.settings.num_iterations > 1:
                        batch["old_logps"] = old_logps
                    if entropy is not None:
                        batch["entropy"] = entropy
            if self.settings.uses_reference():
                with self.reference() as reference:
                    batch["ref_logps"], _ = completion_scores(reference, batch, temperature=sampling.temperature)
            batches.append(batch)
        if self.trains_top_entropy():
            self.mark_high_entropy_tokens(batches)
        return batches

    def trains_top_entropy(self) -> bool:
        return self.settings.top_entropy_quantile < 1

    def mark_high_entropy_tokens(self, batches: list[Batch]) -> None:
        """Each batch's `entropy_mask`: its tokens in the top `top_entropy_quantile` of the entropies of all the
        step's completion tokens on all ranks, under the sampling policy, so that the same tokens train in every
        iteration and the choice does not depend on how the step splits into micro-batches."""
        local = torch.cat([batch["entropy"][batch["targets"] != IGNORE_INDEX] for batch in batches])
        threshold = entropy_threshold(self.collectives.concat(local.float()), self.settings.top_entropy_quantile)
        for batch in batches:
            batch["entropy_mask"] = high_entropy_mask(
                batch.pop("entropy"), batch["targets"] != IGNORE_INDEX, threshold.to(self.device)
            )

    @staticmethod
    def _sampler_logps(rollouts: Sequence[Rollout], shape: torch.Size) -> torch.Tensor:
        """The engine's per-token log-probs in the completions' layout [completions, longest]."""
        logps = torch.zeros(shape)
        for row, rollout in enumerate(rollouts):
            logps[row, : len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
        return logps

    def count_units(self, batch: Batch) -> torch.Tensor:
        return loss_units(
            batch["targets"] != IGNORE_INDEX, self.objective.aggregation, self.step_sampling.max_new_tokens
        )

    def loss_sum(self, batch: Batch) -> LossSum:
        sampling = self.step_sampling
        logps, entropy = completion_scores(self.policy, batch, with_entropy=True, temperature=sampling.temperature)
        mask = batch["targets"] != IGNORE_INDEX
        old_logps = batch.get("old_logps", logps.detach())
        weights, correction = rollout_correction(
            old_logps,
            batch["sampler_logps"],
            mask,
            mode=self.settings.rollout_correction,
            cap=self.settings.rollout_correction_cap,
        )
        result = policy_loss_sum(
            logps,
            old_logps,
            batch["advantages"],
            mask,
            self.objective,
            ref_logps=batch.get("ref_logps"),
            max_completion_length=sampling.max_new_tokens,
            correction_weights=None if self.settings.rollout_correction == "none" else weights,
            entropy_mask=batch.get("entropy_mask"),
        )
        tokens = mask.sum().clamp(min=1)
        token_means = {
            "entropy": (entropy * mask).sum() / tokens,
            # ~0 while the policy samples its own rollouts; the first thing to watch with a separate engine (vLLM)
            "rollout_logprob_diff": ((batch["sampler_logps"] - logps.detach()).abs() * mask).sum() / tokens,
        }
        if self.settings.rollout_correction != "none":
            token_means.update(correction)
        result.metrics.update(
            {name: value if is_extreme(name) else value * result.units for name, value in token_means.items()}
        )
        return result
