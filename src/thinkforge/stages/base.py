"""What every stage shares: the backbone, optimizer and schedule, the accumulation loop, logging and HF export.

A stage subclass owns only its data contract (`build_items`, `collate`) and its loss (`loss_sum`). The loop here
takes one optimizer step per loader batch: it sums each micro-batch's loss, divides by the *global* number of loss
units (tokens, pairs, ...) of the whole step on all ranks, and scales by the data-parallel size because FSDP
averages gradients across ranks. The result is the exact mean over the global batch, independent of how it was
split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import PreTrainedTokenizerBase

from thinkforge.backbone import CausalLM, checkpoint_dtype, compute_dtype, load_hf_model, parallelize, resolve_attn_implementation
from thinkforge.config import TrainConfig, UserError
from thinkforge.data.loader import StageDataModule
from thinkforge.data.packing import IGNORE_INDEX, Document, collate_documents, completion_documents, document_rows, unpack
from thinkforge.data.records import DataError, Records, load_split
from thinkforge.losses import LossSum, is_extreme
from thinkforge.metrics import HeldOutSums, score_rollouts
from thinkforge.rewards.math import math_accuracy_many
from thinkforge.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig
from thinkforge.tokenizer import render_chat, render_prompt

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

# a prompt-shared span needs a dense [tokens, tokens] attention mask; past this many tokens it repeats the prompt
SHARED_PROMPT_MAX_TOKENS = 4096


class NonFiniteStep(UserError):
    """A training step whose loss or gradient norm is not finite."""


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Stage(L.LightningModule):
    """Base LightningModule; subclasses implement `build_items`, `collate` and `loss_sum`."""

    #: the unit the loss is averaged over, e.g. "tokens" or "pairs" (used in log names)
    loss_unit = "tokens"
    #: whether a step whose global batch has no loss unit is a zero-loss step rather than an error
    allows_empty_steps = False
    #: whether `build_items` samples the model (and so waits until it is on its device) instead of reading data
    items_need_model = False

    def __init__(self, run: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.run, self.tokenizer = run, tokenizer
        self.automatic_optimization = False
        self.policy: CausalLM | None = None
        # the frozen reference lives outside the module tree (a dict is not registered), so checkpoints hold no
        # copy of it: it is the starting checkpoint, which a resumed run loads again
        self._frozen: dict[str, CausalLM] = {}
        self.export_dir = Path(run.output_dir) / "export"
        self._val_sums: defaultdict[str, float] = defaultdict(float)
        self.heldout_metrics: dict[str, float] = {}
        self.initial_heldout: dict[str, float] = {}
        attention = resolve_attn_implementation(run.model.attn_implementation)
        # flash-attn takes every document of a micro-batch as one padding-free row; SDPA keeps [B, L] rows
        self.flatten_rows = attention == "flash_attention_2"
        # a custom attention mask (prompt sharing) is SDPA's alone among the backends
        self.masks_attention = attention == "sdpa"
        # unpadded rows are cut to their micro-batch's longest, rounded up to tensor-core friendly widths on GPU
        self.pad_multiple = run.data.pad_to_multiple_of or (64 if torch.cuda.is_available() else 8)
        self._engine: RolloutEngine | None = None
        # the optimizer step whose weights the engine samples (engines that hold a copy of them), and the last sync's time
        self._engine_step = -1
        self.weight_sync_seconds = 0.0

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
        """The units `loss_sum` will return, counted before any forward pass so that a step knows its global count
        first: target tokens here; a stage whose loss has other units says so from its loss module."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def has_val(self) -> bool:
        return self.run.data.val is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["heldout_start"] = self.initial_heldout

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The starting checkpoint's held-out scores were measured once, before the first step; a resumed run
        keeps them instead of measuring the resumed weights."""
        self.initial_heldout = dict(checkpoint.get("heldout_start", {}))

    # ---- model ------------------------------------------------------------------------------------------------
    def datamodule(self) -> StageDataModule:
        return StageDataModule(
            self.build_items,
            self.collate,
            batch_size=self.run.data.batch_size,
            micro_batch_size=self.run.data.micro_batch_size,
            seed=self.run.data.seed,
            has_val=self.has_val(),
            defer=self.items_need_model,
            item_length=self.item_length if self.run.data.group_by_length else None,
        )

    def item_length(self, item: Any) -> int:
        """An item's token count, for `data.group_by_length`; stages whose items have one say so."""
        raise NotImplementedError(f"{type(self).__name__} does not group by length")

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.load_backbone()

    def data_parallel_mesh(self) -> Any:
        """The device mesh under FSDP, None in a single process: the one place that decides on sharding."""
        return self.device_mesh if isinstance(self.trainer.strategy, ModelParallelStrategy) else None

    def load_backbone(self, *, frozen: bool = False) -> CausalLM:
        """The starting checkpoint, sharded like every other copy; `frozen` for reference models."""
        hf_model = load_hf_model(self.run.model, self.tokenizer, param_dtype=torch.float32)
        model = CausalLM(hf_model, self.run.model.logprob_chunk_size)
        if frozen:
            model.requires_grad_(False).eval()
        else:
            model.train()  # from_pretrained returns eval mode; the policy trains (dropout on, where a model has any)
        return parallelize(model, self.data_parallel_mesh(), self.run.hardware, compute_dtype(self.run.model.dtype))

    @property
    def reference(self) -> CausalLM | None:
        return self._frozen.get("reference")

    def load_reference(self) -> None:
        """The frozen starting checkpoint (DPO's reference, GRPO's KL anchor), on the policy's device."""
        if "reference" not in self._frozen:
            self._frozen["reference"] = self.load_backbone(frozen=True).to(self.trainer.strategy.root_device)

    def compute_context(self) -> Any:
        """The compute dtype outside Lightning's own step hooks (generation, precomputed reference log-probs):
        bf16 autocast on one device; a no-op under FSDP, whose mixed-precision policy casts instead."""
        return self.trainer.precision_plugin.forward_context()

    def configure_optimizers(self) -> dict[str, Any]:
        self.warn_of_demo_scale_settings()
        decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.policy.parameters() if p.requires_grad and p.ndim < 2]
        optim = self.run.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, warmup_steps=optim.warmup_steps, total_steps=self.run.trainer.max_steps, min_ratio=optim.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def warn_of_demo_scale_settings(self) -> None:
        """The default learning rate and weight decay (OptimConfig) suit the tiny demo model trained from scratch; a pretrained
        model that gets them unchanged is usually wrecked in a few steps, so say so."""
        optim = self.run.optim
        parameters = sum(p.numel() for p in self.policy.parameters())  # a DTensor counts its global size
        if self.run.model.name_or_path and parameters >= 50e6 and optim.lr >= 1e-3 and self.trainer.is_global_zero:
            log.warning("optim.lr=%g and optim.weight_decay=%g are the tiny demo model's (the defaults); a pretrained "
                        "model of %.0fM parameters is usually fine-tuned at 1e-6 to 2e-5 with weight decay 0 to 0.01: "
                        "set optim.lr and optim.weight_decay", optim.lr, optim.weight_decay, parameters / 1e6)

    # ---- scored completions (DPO, GRPO) -----------------------------------------------------------------------
    def completion_layout(
        self, prompt_ids: Sequence[int], completions: Sequence[tuple[int, Sequence[int], bool]], share_prompt: bool
    ) -> list[Document]:
        """One prompt's completions (member, token ids, trainable) as documents: sharing the prompt where the
        attention backend takes a mask and the span stays small enough for a dense one."""
        if share_prompt and self.masks_attention and len(completions) > 1:
            shared = completion_documents(prompt_ids, completions, share_prompt=True)
            if len(shared[0]) <= SHARED_PROMPT_MAX_TOKENS:
                return shared
        return completion_documents(prompt_ids, completions, share_prompt=False)

    def completion_rows(self, documents: Sequence[Document], capacity: int) -> list[list[Document]]:
        """The documents packed into rows of `capacity` tokens (`data.pack`), else one per row (padded)."""
        return document_rows(documents, capacity, pack=self.run.data.pack)

    def collate_completions(self, rows: Sequence[Sequence[Document]], capacity: int) -> Batch:
        return collate_documents(rows, self.tokenizer.pad_token_id, capacity=capacity, flatten=self.flatten_rows and self.run.data.pack)

    @staticmethod
    def completion_scores(
        model: CausalLM, batch: Batch, *, with_entropy: bool = False, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (and entropy) of the batch's completions, [completions, longest], 0 past each end:
        one forward over the packed rows, read back out through `unpack_index`."""
        logprobs, entropy = model(
            batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], attention_mask=batch.get("attention_mask"),
            with_entropy=with_entropy, temperature=temperature,
        )
        index = batch["unpack_index"]
        return unpack(logprobs, index), None if entropy is None else unpack(entropy, index)

    # ---- distributed helpers -------------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return self.trainer.world_size

    def global_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    def global_extremes(self, extremes: dict[str, float]) -> dict[str, float]:
        """Each `…/min` or `…/max` metric over all ranks."""
        if self.trainer.world_size == 1 or not extremes:
            return extremes
        combined = {}
        for name in sorted(extremes):
            op = torch.distributed.ReduceOp.MIN if name.endswith("/min") else torch.distributed.ReduceOp.MAX
            value = torch.tensor(extremes[name], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(value, op=op)
            combined[name] = value.item()
        return combined

    def rank_share(self, count: int) -> list[int]:
        """This rank's share of `count` items: every world_size-th, trimmed so all ranks get as many (each rank
        must make the same number of sharded generate calls)."""
        world = self.trainer.world_size
        return list(range(self.trainer.global_rank, count - count % world, world))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.trainer.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def _set_gradient_sync(self, enabled: bool) -> None:
        if hasattr(self.policy, "set_requires_gradient_sync"):
            self.policy.set_requires_gradient_sync(enabled)

    # ---- training ---------------------------------------------------------------------------------------------
    def batches_consumed(self) -> int:
        """The data position: loader batches fully used so far (one per optimizer step unless a stage says else)."""
        return self.global_step

    def training_step(self, micro_batches: list[Batch], batch_idx: int) -> None:
        self.optimization_step(micro_batches)

    def optimization_step(
        self, micro_batches: list[Batch], extra_metrics: dict[str, float] | None = None, prefix: str = "train/"
    ) -> None:
        """One optimizer step over this rank's micro-batches; the loss is the exact mean over the global batch."""
        started = time.perf_counter()
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        units = self.global_sum(sum(self.count_units(batch) for batch in micro_batches))
        if units.item() == 0:
            if not self.allows_empty_steps:
                raise RuntimeError(f"step {self.global_step}: the global batch has no {self.loss_unit} to train on")
            log.warning("step %d: the global batch has no %s to train on; its loss is 0", self.global_step, self.loss_unit)
        scale = self.data_parallel_size / units.float().clamp(min=1)
        sums: defaultdict[str, float] = defaultdict(float)
        extremes: dict[str, float] = {}
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(micro_batches):
            self._set_gradient_sync(index == len(micro_batches) - 1)
            loss, _, metrics = self.loss_sum(batch)
            self.manual_backward(loss * scale)
            step_loss += loss.detach()
            for name, value in metrics.items():
                if is_extreme(name):
                    pick = min if name.endswith("/min") else max
                    extremes[name] = pick(extremes.get(name, float(value)), float(value))
                else:
                    sums[name] += float(value)
            sums["tokens"] += float(batch["num_tokens"])
            sums["slots"] += float(batch["num_slots"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.run.optim.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.stop_unless_finite(step_loss, grad_norm)
        sums["loss"] = step_loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        schedule.step()
        extra = {**(extra_metrics or {}), **self.global_extremes(extremes)}
        self._log_step(sums, units, grad_norm, lr, time.perf_counter() - started, extra, prefix)

    def stop_unless_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A NaN or infinite loss or gradient norm on any rank stops the run before the optimizer step would
        write it into the weights, so every checkpoint already saved holds finite weights."""
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if self.global_sum(float(not finite)).item() == 0:
            return
        checkpoints = Path(self.run.output_dir) / "checkpoints"
        raise NonFiniteStep(
            f"step {self.global_step}: the loss is {float(loss):g} and the gradient norm {float(grad_norm):g} (this "
            f"rank's); stopped before this step's optimizer update, so the checkpoints in {checkpoints} are intact. "
            "Lower optim.lr or check the data; re-running the command resumes from the last one"
        )

    def _log_step(
        self,
        sums: dict[str, float],
        units: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: float,
        seconds: float,
        extra: dict[str, float],
        prefix: str,
    ) -> None:
        names = sorted(sums)
        totals = dict(zip(names, self.global_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64)).tolist()))
        metrics = {name: totals[name] / max(units.item(), 1.0) for name in names if name not in ("tokens", "slots")}
        metrics.update(
            {
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": totals["tokens"] / max(seconds, 1e-9),
                "step_s": seconds,
                "fill_ratio": totals["tokens"] / max(totals["slots"], 1.0),
                self.loss_unit: units.item(),
                **extra,
            }
        )
        self.log_dict({prefix + name: value for name, value in metrics.items()}, prog_bar=False, rank_zero_only=True)
        if prefix == "train/":
            self.log("loss", metrics["loss"], prog_bar=True, logger=False, rank_zero_only=True)

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_step(self, micro_batches: list[Batch], batch_idx: int) -> None:
        for batch in micro_batches:
            loss, units, metrics = self.loss_sum(batch)
            self._val_sums["loss"] += float(loss)
            self._val_sums["units"] += float(units)
            for name, value in metrics.items():
                self._val_sums[name] += float(value)

    def on_validation_epoch_end(self) -> None:
        names = ["loss", "units"] + sorted(n for n in self._val_sums if n not in ("loss", "units"))
        totals = dict(zip(names, self.global_sum(torch.tensor([self._val_sums[n] for n in names], dtype=torch.float64)).tolist()))
        self._val_sums.clear()
        if totals["units"] == 0:
            return
        metrics = {f"val/{name}": totals[name] / totals["units"] for name in names if name != "units"}
        self.log_dict(metrics, prog_bar=True, rank_zero_only=True)

    # ---- held-out evaluation and handoff ---------------------------------------------------------------------
    #: whether the stage's training rows carry gold answers (prompt + answer), so held-out prompts can be cut from them
    trains_on_answers = False

    def reads_stated_answers(self) -> bool:
        """Whether this stage's reward reads stated answers (stage.answer_extraction=lenient); held-out scores
        then read them too, or they would grade another format than the one the stage trains."""
        return False

    def heldout_verifier(self, completions: Sequence[str], golds: Sequence[str]) -> list[float]:
        return math_accuracy_many(completions, golds, lenient=self.reads_stated_answers(), guess=False)

    def holds_out_from_train(self) -> bool:
        """No data.val but held-out scores asked for: the last `heldout.num_prompts` training rows are held out
        (never trained on), for the stages whose rows have gold answers."""
        return self.run.data.val is None and self.run.heldout.num_prompts > 0 and self.trains_on_answers

    def scores_heldout(self) -> bool:
        return bool(self.run.heldout.num_prompts) and (self.run.data.val is not None or self.holds_out_from_train())

    def training_rows(self, records: Records) -> list[dict[str, Any]]:
        """The training split's rows, less the held-out slice when there is one (named in the log)."""
        if not self.holds_out_from_train():
            return records.rows
        count = self.run.heldout.num_prompts
        if count >= len(records.rows):
            raise DataError(f"{records.source}: heldout.num_prompts={count} would hold out all {len(records.rows)} rows "
                            "(data.val is null); lower it or set data.val")
        log.info("held-out prompts: the last %d rows of %s (data.val is null), not trained on", count, records.source)
        return records.rows[:-count]

    def on_fit_start(self) -> None:
        if self.run.heldout.num_prompts and not self.scores_heldout() and self.trainer.is_global_zero:
            log.warning("no held-out scores: data.val is null and %s's rows carry no gold answers; set data.val to a "
                        "prompt + answer file, or heldout.num_prompts=0", type(self).__name__)

    def on_train_end(self) -> None:
        self.export_hf(self.export_dir)
        if self.scores_heldout():
            self.heldout_metrics = self.evaluate_heldout()
            self.log_outside_steps(self.heldout_metrics, "heldout/")

    def log_outside_steps(self, metrics: dict[str, float], prefix: str) -> None:
        """Metrics measured outside a training step (held-out scores before and after the stage), written
        straight to every logger at the current step: Lightning's `self.log` is closed in these hooks."""
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics({prefix + name: value for name, value in metrics.items()}, step=self.global_step)
            logger.save()

    def heldout_max_new_tokens(self) -> int:
        return self.run.heldout.max_new_tokens or self.completion_length()

    def completion_length(self) -> int:
        """How long this stage's completions may be: held-out generation follows it unless heldout sets one."""
        return self.run.data.max_length

    def heldout_prompts(self) -> tuple[list[str], list[str]]:
        """Held-out prompts rendered for generation, and their gold answers: data.val's first, or the training
        rows held out from training."""
        count = self.run.heldout.num_prompts
        if self.holds_out_from_train():
            rows = load_split(self.run.data, "train", required=("prompt", "answer")).rows[-count:]
        else:
            rows = load_split(self.run.data, "val", required=("prompt", "answer")).rows[:count]
        prompts = [self.render_prompt(row["prompt"]) for row in rows]
        return prompts, [row["answer"] for row in rows]

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        return render_chat(self.tokenizer, messages, system_prompt=self.run.data.system_prompt, add_generation_prompt=add_generation_prompt)

    def render_prompt(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, prompt, self.run.data.system_prompt)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int) -> list[list[Rollout]]:
        """This rank's prompts sampled from the policy's current weights by the configured engine (`rollout.*`),
        created once per stage; under FSDP every rank must call it together."""
        engine = self.rollout_engine()
        if engine.holds_weights and self._engine_step != self.global_step:
            started = time.perf_counter()
            engine.update_weights(self.policy_weights())
            self.weight_sync_seconds, self._engine_step = time.perf_counter() - started, self.global_step
        with contextlib.nullcontext() if engine.holds_weights else self.compute_context():
            groups = engine.generate(prompts, sampling, seed=seed)
        engine.sleep()
        return groups

    def rollout_engine(self) -> RolloutEngine:
        if self._engine is None:
            if self.run.rollout.engine == "hf":
                self._engine = HFEngine(self.policy, self.tokenizer, batch_size=self.run.heldout.batch_size, synced=self.trainer.world_size > 1)
            else:
                self._engine = self._vllm_engine()
        return self._engine

    def _vllm_engine(self) -> RolloutEngine:
        """vLLM serving the starting checkpoint's directory (or hub id), or an export of the policy when it was
        built from a config; `generate` syncs the policy's weights into it whenever they moved on since."""
        from thinkforge.rollout.vllm import VLLMEngine

        source = self.run.model.name_or_path
        self._engine_step = 0
        if source is None:
            source = Path(self.run.output_dir) / "rollout_model"
            self.export_hf(source)
            self._engine_step = self.global_step
        longest = self.run.data.max_length + max(self.completion_length(), self.heldout_max_new_tokens())
        longest = min(longest, getattr(self.policy.hf.config, "max_position_embeddings", None) or longest)
        return VLLMEngine(source, self.tokenizer, self.run.rollout, max_model_len=longest, seed=self.run.seed + self.global_rank)

    def policy_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's parameters under their HF names, full: under FSDP each is gathered as the reader asks for
        it, so the whole model never sits unsharded in memory at once (and every rank gathers in the same order).
        A tied parameter comes under each of its names: vLLM on CPU packs the LM head's copy of the embedding
        apart, and keeps the stale one unless `lm_head.weight` arrives too."""
        for name, parameter in self.policy.hf.named_parameters(remove_duplicate=False):
            yield name, (parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter).detach()

    def evaluate_heldout(self, filename: str | None = "heldout.json") -> dict[str, float]:
        prompts, golds = self.heldout_prompts()
        heldout = self.run.heldout
        sampling = SamplingConfig(heldout.num_samples, heldout.temperature, heldout.top_p, self.heldout_max_new_tokens())
        groups, golds_here = self._generate_share(prompts, golds, sampling, seed=self.run.seed)
        sums = score_rollouts(groups, golds_here, self.heldout_verifier)
        total = HeldOutSums(*self.global_sum(torch.tensor(sums.as_list(), dtype=torch.float64)).tolist())
        metrics = total.metrics()
        if heldout.pass_k:
            metrics.update(self._heldout_pass_at_k(prompts[: heldout.pass_k_prompts], golds[: heldout.pass_k_prompts]))
        if self.trainer.is_global_zero and filename:
            (Path(self.run.output_dir) / filename).write_text(json.dumps({**metrics, "samples": total.samples}, indent=2))
            log.info("held-out: %s", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    def _generate_share(
        self, prompts: list[str], golds: list[str], sampling: SamplingConfig, *, seed: int
    ) -> tuple[list[list[Rollout]], list[str]]:
        """This rank's share of the prompts, sampled, and their gold answers."""
        share = self.rank_share(len(prompts))
        groups = self.generate([prompts[i] for i in share], sampling, seed=seed + self.trainer.global_rank)
        return groups, [golds[i] for i in share]

    def _heldout_pass_at_k(self, prompts: list[str], golds: list[str]) -> dict[str, float]:
        """pass@k (a prompt counts when any of its k samples is right) and the sampled pass@1 at that temperature."""
        heldout = self.run.heldout
        sampling = SamplingConfig(heldout.pass_k, heldout.pass_k_temperature, 1.0, self.heldout_max_new_tokens())
        groups, golds_here = self._generate_share(prompts, golds, sampling, seed=self.run.seed + 1)
        scores = self.heldout_verifier([r.text for g in groups for r in g], [gold for g, gold in zip(groups, golds_here) for _ in g])
        k = heldout.pass_k
        solved = sum(any(scores[i * k : (i + 1) * k]) for i in range(len(groups)))
        correct, solved, count = self.global_sum(torch.tensor([sum(scores), solved, len(groups)], dtype=torch.float64)).tolist()
        return {f"pass@{k}": solved / count, "sampled_accuracy": correct / (count * k)}

    def export_hf(self, directory: Path) -> None:
        """A consolidated HF checkpoint (also from FSDP shards): the handoff format for the next stage."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.trainer.is_global_zero:
            # Gathered copies no longer share storage, so HF cannot see tied weights: drop their targets ourselves.
            tied = set(getattr(self.policy.hf, "all_tied_weights_keys", None) or ())
            dtype = checkpoint_dtype(self.run.model)  # a bf16 model stays bf16 on disk; the fp32 masters are for training
            state = {key: tensor.to(dtype) for name, tensor in state.items() if (key := name.removeprefix("hf.")) not in tied}
            self.policy.hf.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            log.info("exported HF checkpoint to %s", directory)
        self.trainer.strategy.barrier("export")
