"""What every stage shares: the backbone and one optimizer step per loader batch. A stage owns its data contract
(`build_items`, `collate`) and its loss (`loss_sum`); the step divides the summed loss by the *global* count of loss
units (tokens, pairs, ...) and scales by the data-parallel size (FSDP averages gradients over ranks): the exact mean
over the global batch, however it was split. Its parts live beside it (heldout, completions, export, steps)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LRScheduler

from thinkforge.adapters import base_weights
from thinkforge.backbone import CausalLM, build_backbone, resolve_attn_implementation
from thinkforge.chat import ChatFormat
from thinkforge.collectives import Collectives
from thinkforge.config import TrainConfig
from thinkforge.data.loader import StageDataModule
from thinkforge.data.packing import IGNORE_INDEX
from thinkforge.losses import LossSum
from thinkforge.optim import build_optimizer, warn_of_demo_scale_settings
from thinkforge.preemption import StopRequest
from thinkforge.progress import GenerationProgress
from thinkforge.resume import data_position
from thinkforge.rollout.base import EnginePrompt, Rollout
from thinkforge.rollout.sampler import PolicySampler
from thinkforge.rollout.settings import SamplingParams
from thinkforge.rollout.tools import ToolRollouts
from thinkforge.stages.completions import Batch, CompletionBatcher
from thinkforge.stages.export import BEST_EXPORT, export_hf
from thinkforge.stages.heldout import BEST_SCORES, HeldOut, best_point, describe_scores, last_due_point
from thinkforge.stages.probe import StageProbe
from thinkforge.stages.steps import StepSums, stop_unless_finite

log = logging.getLogger(__name__)

#: set in a sampling that runs in the background while the trainer trains (GRPO sampling ahead on a server): the
#: optimizer step whose weights were pushed to the engine before it started, which it samples with
WEIGHTS_STEP: ContextVar[int | None] = ContextVar("WEIGHTS_STEP", default=None)
#: set in that same sampling under FSDP: its collectives, over a process group of its own (on the trainer's, they
#: would interleave with the training step's)
BACKGROUND_COLLECTIVES: ContextVar[Collectives | None] = ContextVar("BACKGROUND_COLLECTIVES", default=None)


class Stage(L.LightningModule):
    """Base LightningModule; subclasses implement `build_items`, `collate` and `loss_sum`."""

    #: the unit the loss is averaged over, e.g. "tokens" or "pairs" (used in log names)
    loss_unit = "tokens"
    #: whether a step whose global batch has no loss unit is a zero-loss step rather than an error
    allows_empty_steps = False
    #: whether `build_items` samples the model (and so waits until it is on its device) instead of reading data
    items_need_model = False
    #: optimizer steps per loader batch (GRPO: stage.num_iterations)
    steps_per_batch = 1
    #: the step's metrics the progress bar (and the step log under a non-TTY) shows, under their short names
    headline_metrics: tuple[tuple[str, str], ...] = (("loss", "loss"),)
    #: held-out points between the start and the end when `heldout.every_n_steps` is null (the RL stages: 4)
    default_heldout_points = 0
    #: the trained model, set by `configure_model` (on its device, sharded under FSDP)
    policy: CausalLM

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__()
        self.run, self.chat, self.tokenizer = run, chat, chat.tokenizer
        self.automatic_optimization = False
        # outside the module tree (a dict is not registered): checkpoints hold no copy of the reference
        self.frozen: dict[str, CausalLM] = {}
        self.export_dir = Path(run.output_dir) / "export"
        self.validates = run.data.val is not None
        self.heldout = HeldOut(run.heldout, run.data, run.stage, chat, output_dir=run.output_dir, seed=run.seed)
        self.heldout_metrics: dict[str, float] = {}
        self.initial_heldout: dict[str, float] = {}
        #: every held-out point of this run, the last step's included: {"step": s, <metric>: value, ...}
        self.heldout_history: list[dict[str, float]] = []
        self.heldout_seconds, self.train_started = 0.0, time.perf_counter()
        self.attention = resolve_attn_implementation(run.model.attn_implementation)
        self.batcher = CompletionBatcher.for_attention(chat.pad_id, self.attention, pack=run.data.pack)
        self.sampler: PolicySampler | None = None
        #: the multi-turn loop around the sampler when the model may call tools (`tools=python`)
        self.tool_rollouts: ToolRollouts | None = None
        if run.tools.enabled:
            self.tool_rollouts = ToolRollouts(
                self.sample_policy,
                chat,
                run.tools,
                synced_any=lambda local: bool(self.collectives.sum(int(local)).item() > 0),
            )
        self._val_sums = StepSums()
        # replaced by thinkforge.preemption.Preemption's when a trainer runs the stage
        self.stop_request = StopRequest()
        self.batch_start_step = 0

    # ---- the stage's contract -------------------------------------------------------------------------------
    def build_items(self, split: str) -> Sequence[Any]:
        """Train ('train') or validation ('val') items: packed rows, pairs, prompts, ..."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> Batch:
        raise NotImplementedError

    def loss_sum(self, batch: Batch) -> LossSum:
        """The micro-batch's loss and metrics summed over its units (a loss function's own return value)."""
        raise NotImplementedError

    def count_units(self, batch: Batch) -> torch.Tensor:
        """The units `loss_sum` will return (target tokens here), counted before any forward pass."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def completion_length(self) -> int:
        """How long this stage's completions may be: held-out generation follows it unless heldout sets one."""
        return self.run.data.max_sequence_length

    def probe(self) -> StageProbe[Any]:  # what thinkforge-doctor reads of the stage
        return StageProbe(self)

    def item_length(self, item: Any) -> int:
        """An item's length in tokens, for `data.group_by_length` (stages whose rows have one override it)."""
        raise NotImplementedError(f"{type(self).__name__} items have no length to group by")

    def datamodule(self) -> StageDataModule:
        data = self.run.data
        return StageDataModule(
            self.build_items,
            self.collate,
            batch_size=data.batch_size,
            micro_batch_size=data.micro_batch_size,
            seed=data.seed,
            has_val=self.validates,
            defer=self.items_need_model,
            start_step=lambda: data_position(self.global_step, self.steps_per_batch),
            # only midtrain and SFT rows have a length (the other schemas refuse data.group_by_length)
            item_length=self.item_length if data.group_by_length else None,
        )

    def configure_model(self) -> None:
        if getattr(self, "policy", None) is None:  # built once: a restarted fit keeps its weights
            self.policy = self.load_backbone()
        if self.run.stage.uses_reference() and not self.run.model.lora.rank and "reference" not in self.frozen:
            self.frozen["reference"] = self.load_backbone(frozen=True).to(self.trainer.strategy.root_device)

    @contextlib.contextmanager
    def reference(self) -> Iterator[CausalLM]:
        """The starting checkpoint, without gradients: the frozen copy, or with LoRA the policy's base weights
        (its adapter switched off), which are the starting checkpoint without a second copy in memory."""
        with torch.no_grad(), base_weights(self.policy.hf if "reference" not in self.frozen else None):
            yield self.frozen.get("reference", self.policy)

    def load_backbone(self, *, frozen: bool = False) -> CausalLM:
        """The starting checkpoint, sharded over the data-parallel mesh under FSDP; `frozen` for references."""
        mesh = self.device_mesh if isinstance(self.trainer.strategy, ModelParallelStrategy) else None
        return build_backbone(self.run.model, self.run.hardware, self.chat, mesh, frozen=frozen)

    @property
    def collectives(self) -> Collectives:
        return BACKGROUND_COLLECTIVES.get() or Collectives(self.global_rank, self.trainer.world_size, self.device)

    @property
    def loaded_data(self) -> StageDataModule:
        """The data module the trainer runs this stage with (its loaders' state is what resume restores)."""
        return cast(StageDataModule, self.trainer.datamodule)  # type: ignore[attr-defined]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        if self.trainer.is_global_zero:
            warn_of_demo_scale_settings(self.policy, self.run.optim, self.run.model, self.run.trainer.max_steps)
        return build_optimizer(self.policy, self.run.optim, self.run.trainer.max_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.batch_start_step = self.global_step

    def training_step(self, micro_batches: list[Batch], batch_idx: int) -> None:
        self.optimization_step(micro_batches)

    def optimization_step(
        self, micro_batches: list[Batch], extra_metrics: dict[str, float] | None = None, prefix: str = "train/"
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; the loss is the exact mean over the global batch.
        Returns the step's metrics (means over the global batch), as logged."""
        started = time.perf_counter()
        # one optimizer and one per-step schedule: `configure_optimizers` returns exactly those
        optimizer = cast(LightningOptimizer, self.optimizers())
        schedule = cast(LRScheduler, self.lr_schedulers())
        units = self.collectives.sum(sum(self.count_units(batch) for batch in micro_batches)).item()
        if units == 0:
            if not self.allows_empty_steps:
                raise RuntimeError(f"step {self.global_step}: the global batch has no {self.loss_unit} to train on")
            log.warning("step %d: no %s to train on; its loss is 0", self.global_step, self.loss_unit)
        scale = self.trainer.world_size / max(units, 1.0)
        sums = StepSums()
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        # a stop point while no optimizer step of this loader batch is done (GRPO's later iterations run on)
        first_pass = self.global_step == self.batch_start_step
        for index, batch in enumerate(micro_batches):
            if first_pass and (index == 0 or self.trainer.world_size == 1):
                self.stop_request.check(collective=True)
            if isinstance(self.policy, FSDPModule):  # FSDP reduces gradients after the last micro-batch only
                self.policy.set_requires_gradient_sync(index == len(micro_batches) - 1)
            loss, _, metrics = self.loss_sum(batch)
            self.manual_backward(loss * scale)
            step_loss += loss.detach()
            sums.add(metrics, batch)
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.run.optim.max_grad_norm)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total_loss = step_loss.item()
        stop_unless_finite(self.collectives, self.global_step, total_loss, grad_norm, self.run.output_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = float(schedule.get_last_lr()[0])
        schedule.step()
        step_metrics = sums.metrics(self.collectives, total_loss, units, grad_norm, lr, time.perf_counter() - started)
        step_metrics.update({self.loss_unit: units, **(extra_metrics or {})})
        self.log_dict(
            {prefix + name: value for name, value in step_metrics.items()}, prog_bar=False, rank_zero_only=True
        )
        if prefix == "train/":
            for name, short in self.headline_metrics:
                if name in step_metrics:
                    self.log(short, step_metrics[name], prog_bar=True, logger=False, rank_zero_only=True)
        return step_metrics

    def validation_step(self, micro_batches: list[Batch], batch_idx: int) -> None:
        for batch in micro_batches:
            loss, units, metrics = self.loss_sum(batch)
            self._val_sums.add({"loss": loss, "units": units, **metrics}, batch)

    def on_validation_epoch_end(self) -> None:
        means, self._val_sums = self._val_sums.means(self.collectives, prefix="val/"), StepSums()
        if means:
            self.log_dict(means, prog_bar=True, rank_zero_only=True)

    def generate(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """This rank's prompts sampled from the policy's current weights (`rollout.*`), calling tools between turns
        where the run has them (`tools.*`); every rank calls it together."""
        if self.tool_rollouts is not None:
            return self.tool_rollouts(prompts, sampling, seed=seed, progress=progress)
        return self.sample_policy(prompts, sampling, seed=seed, progress=progress)

    def sample_policy(
        self,
        prompts: Sequence[EnginePrompt],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """One turn of this rank's prompts, sampled from the policy's current weights (`rollout.*`), or in a
        sampling started in the background, from those of the step it was started at (`WEIGHTS_STEP`)."""
        pinned = WEIGHTS_STEP.get()
        step = self.global_step if pinned is None else pinned
        return self.policy_sampler().generate(prompts, sampling, seed=seed, step=step, progress=progress)

    def policy_sampler(self) -> PolicySampler:
        """The stage's sampler, created on first use."""
        if self.sampler is None:
            completions = self.completion_length()
            longest = self.run.stage.longest_prompt(self.run.data) + max(
                completions, self.heldout.sampling(completions).max_new_tokens
            )
            self.sampler = PolicySampler(
                self.policy,
                self.chat,
                self.run.rollout,
                starting_weights=self.run.model.name_or_path,
                export=self.export_for_engine,
                longest_sequence=longest,
                seed=self.run.seed + self.global_rank,
                world_size=self.trainer.world_size,
                compute_context=self.trainer.precision_plugin.forward_context,
                stop_point=lambda: self.stop_request.check(),
            )
        return self.sampler

    def export_for_engine(self) -> Path:
        """The policy as an HF directory, for an engine that loads its own copy of a model built from a config."""
        directory = Path(self.run.output_dir) / "rollout_model"
        export_hf(self.policy, self.tokenizer, self.run.model, self.trainer.strategy, directory)
        return directory

    def evaluate_heldout(self, filename: str | None = "heldout.json", *, with_pass_k: bool = True) -> dict[str, float]:
        started = time.perf_counter()
        metrics = self.heldout.evaluate(
            self.generate, self.collectives, self.completion_length(), filename=filename, with_pass_k=with_pass_k
        )
        self.heldout_seconds += time.perf_counter() - started
        return metrics

    # ---- held-out points during training (`heldout.every_n_steps`) and the best of them (`heldout.keep_best`) --
    def heldout_every(self) -> int:
        """Optimizer steps between held-out points during training; 0: none."""
        every = self.run.heldout.every_n_steps
        if every is None:  # at most `default_heldout_points` points strictly between the start and the end
            points = self.default_heldout_points
            every = -(-self.run.trainer.max_steps // (points + 1)) if points else 0
        return every if self.heldout.enabled() else 0

    def heldout_point_if_due(self) -> None:
        step, every = self.global_step, self.heldout_every()
        if every and step < self.run.trainer.max_steps and last_due_point(step, every, self.steps_per_batch) == step:
            self.measure_heldout_point()

    def measure_heldout_point(self, *, final: bool = False) -> None:
        """Scores, logs and keeps one point; the best so far also becomes `export_best/` (`heldout.keep_best`).
        `final`: the stage's last, whose scores are `heldout.json` and whose weights are `export/` already. A stop
        asked for meanwhile waits for the point, so the checkpoint it saves holds it."""
        step = self.global_step
        with self.stop_request.deferred():
            metrics = self.evaluate_heldout(
                filename="heldout.json" if final else None,
                with_pass_k=final or self.run.heldout.pass_k_at_points,
            )
        self.heldout.log_outside_steps(self.trainer, metrics, "heldout/")
        self.heldout_history.append({"step": step, **metrics})
        if self.trainer.is_global_zero:
            spent = self.heldout_seconds / max(time.perf_counter() - self.train_started, 1e-9)
            log.info(
                "held-out at step %d: %s (held-out scoring so far: %.0f%% of the stage's time)",
                step,
                describe_scores(metrics),
                100 * spent,
            )
        self.on_heldout_point(step, metrics)
        if self.run.heldout.keep_best is not None:
            self.keep_if_best(step, metrics, self.run.heldout.keep_best, exported=final)
        if final:
            self.heldout_metrics = metrics

    def on_heldout_point(self, step: int, metrics: dict[str, float]) -> None:
        """What a stage reads from a held-out point as it is measured (GRPO: its collapse watch)."""

    def keep_if_best(self, step: int, metrics: dict[str, float], metric: str, *, exported: bool) -> None:
        """`exported`: this step's weights are `export/` already (copied, not gathered again)."""
        best = best_point(self.heldout_history, metric)
        if best is None or best["step"] != step:
            return
        directory = Path(self.run.output_dir) / BEST_EXPORT
        if exported:
            if self.trainer.is_global_zero:
                shutil.rmtree(directory, ignore_errors=True)
                shutil.copytree(self.export_dir, directory)
            self.trainer.strategy.barrier("best export")
        else:
            if self.trainer.is_global_zero:
                shutil.rmtree(directory, ignore_errors=True)
            export_hf(self.policy, self.tokenizer, self.run.model, self.trainer.strategy, directory)
        if self.trainer.is_global_zero:
            best_scores = {"step": step, "metric": metric, **metrics}
            (Path(self.run.output_dir) / BEST_SCORES).write_text(json.dumps(best_scores, indent=2))
            log.info(
                "held-out %s %.3f at step %d: the best so far, kept in %s", metric, metrics[metric], step, directory
            )

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            self.heldout.warn_when_missing(type(self).__name__)

    def on_train_start(self) -> None:
        self.train_started = time.perf_counter()

    def on_train_end(self) -> None:
        export_hf(self.policy, self.tokenizer, self.run.model, self.trainer.strategy, self.export_dir)
        if self.heldout.enabled():
            self.measure_heldout_point(final=True)
