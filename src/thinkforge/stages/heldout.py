"""Held-out scores of a stage's policy, before, during (`heldout.every_n_steps`) and after it trains: greedy pass@1,
EOS rate and mean length on `heldout.num_prompts` prompts, and pass@k with the sampled pass@1 at
`heldout.pass_k_temperature` when asked; each point's first samples beside the scores, for a reader to look at."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from thinkforge.chat import ChatFormat
from thinkforge.collectives import Collectives
from thinkforge.config import DataConfig, HeldOutConfig, StageSchema
from thinkforge.data.records import GOLD, DataError, Records, load_split
from thinkforge.loggers import log_samples
from thinkforge.metrics import HeldOutSums, score_rollouts
from thinkforge.progress import GenerationProgress
from thinkforge.rewards.grading import Gold, verify_many
from thinkforge.rollout.base import Generate, Rollout
from thinkforge.rollout.settings import SamplingParams
from thinkforge.stages.export import BEST_EXPORT

log = logging.getLogger(__name__)

#: the best held-out point's step and scores (`heldout.keep_best`), beside its weights in export_best/
BEST_SCORES = "heldout_best.json"


class HeldOut:
    """`trains_on_answers`: the stage's training rows carry gold answers (prompt + answer), so held-out prompts can
    be cut from them when data.val is null. `lenient`: the stage grades stated answers; held-out scores read them
    too, or they would grade another format than the one the stage trains (both from the stage's schema)."""

    def __init__(
        self,
        settings: HeldOutConfig,
        data: DataConfig,
        stage: StageSchema,
        chat: ChatFormat,
        *,
        output_dir: str,
        seed: int,
    ) -> None:
        self.settings, self.data, self.chat = settings, data, chat
        self.output_dir, self.seed = Path(output_dir), seed
        self.trains_on_answers, self.lenient = stage.trains_on_answers(), stage.reads_stated_answers()
        #: rank 0's samples of the last evaluation: prompt, completion, gold, correct, finished, tokens
        self.samples: list[dict[str, Any]] = []

    def warn_when_missing(self, stage_name: str) -> None:
        if self.settings.num_prompts and not self.enabled():
            log.warning(
                "no held-out scores: data.val is null and %s's rows carry no gold answers; set data.val to a "
                "prompt + answer file, or heldout.num_prompts=0",
                stage_name,
            )

    def sampling(self, completion_length: int) -> SamplingParams:
        """heldout.sampling, its token budget as long as the stage's own completions may be unless it sets one."""
        return self.settings.sampling.at(max_new_tokens=completion_length)

    def log_outside_steps(self, trainer: Any, metrics: dict[str, float], prefix: str) -> None:
        """Scores measured outside a training step (before, between and after the steps), written straight to
        every logger at the current step (Lightning's `self.log` is closed in the hooks they are measured in), with
        the first `heldout.log_samples` samples as a table where the logger keeps tables (W&B)."""
        if not trainer.is_global_zero:
            return
        samples = [{"step": trainer.global_step, **sample} for sample in self.samples[: self.settings.log_samples]]
        for logger in trainer.loggers:
            logger.log_metrics({prefix + name: value for name, value in metrics.items()}, step=trainer.global_step)
            if samples:
                log_samples(logger, prefix + "samples", samples, step=trainer.global_step)
            logger.save()

    def verify(self, completions: Sequence[str], golds: Sequence[Gold]) -> list[float]:
        return verify_many(completions, golds, lenient=self.lenient, guess=False)

    def cuts_from_train(self) -> bool:
        """No data.val but held-out scores asked for: the last `heldout.num_prompts` training rows are held out
        (never trained on), for the stages whose rows have gold answers."""
        return self.data.val is None and self.settings.num_prompts > 0 and self.trains_on_answers

    def enabled(self) -> bool:
        return bool(self.settings.num_prompts) and (self.data.val is not None or self.cuts_from_train())

    def training_rows(self, records: Records) -> list[dict[str, Any]]:
        """The training split's rows, less the held-out slice when there is one (named in the log)."""
        if not self.cuts_from_train():
            return records.rows
        count = self.settings.num_prompts
        if count >= len(records.rows):
            raise DataError(
                f"{records.source}: heldout.num_prompts={count} would hold out all {len(records.rows)} rows "
                "(data.val is null); lower it or set data.val"
            )
        log.info("held-out prompts: the last %d rows of %s (data.val is null), not trained on", count, records.source)
        return records.rows[:-count]

    def rows(self) -> list[dict[str, Any]]:
        """The held-out rows (prompt, gold): data.val's first, or the training rows held out from training."""
        count = self.settings.num_prompts
        if self.cuts_from_train():
            return load_split(self.data, "train", required=("prompt", GOLD)).rows[-count:]
        return load_split(self.data, "val", required=("prompt", GOLD)).rows[:count]

    def evaluate(
        self,
        generate: Generate,
        collectives: Collectives,
        completion_length: int,
        *,
        filename: str | None,
        with_pass_k: bool = True,
    ) -> dict[str, float]:
        """Every rank scores its share; rank 0 writes `filename` in the run directory (None: write nothing).
        `with_pass_k`: pass@k too, when `heldout.pass_k` asks for it."""
        sampling = self.sampling(completion_length)
        rows = self.rows()
        prompts, golds = [self.chat.prompt(row["prompt"]) for row in rows], [row[GOLD] for row in rows]
        share = collectives.share(len(prompts))
        progress = GenerationProgress(len(share) * sampling.num_samples, "held-out") if collectives.rank == 0 else None
        try:
            groups = generate(
                [prompts[i] for i in share], sampling, seed=self.seed + collectives.rank, progress=progress
            )
        finally:
            if progress is not None:
                progress.close()
        sums, scores = score_rollouts(groups, [golds[i] for i in share], self.verify)
        total = HeldOutSums(*collectives.sum(sums.as_list()).tolist())
        if collectives.rank == 0:
            self.samples = sample_rows([rows[i] for i in share], groups, scores)
        metrics = total.metrics()
        if self.settings.pass_k and with_pass_k:
            count = self.settings.pass_k_prompts
            metrics.update(self.pass_at_k(prompts[:count], golds[:count], generate, collectives, sampling))
        if collectives.rank == 0 and filename:
            path = self.output_dir / filename
            path.write_text(json.dumps({**metrics, "samples": total.samples}, indent=2))
            with path.with_name(f"{path.stem}_samples.jsonl").open("w") as handle:
                handle.writelines(json.dumps(sample) + "\n" for sample in self.samples)
        return metrics

    def pass_at_k(
        self,
        prompts: list[str],
        golds: list[Gold],
        generate: Generate,
        collectives: Collectives,
        greedy: SamplingParams,
    ) -> dict[str, float]:
        """pass@k (a prompt counts when any of its k samples is right) and the sampled pass@1 at that temperature."""
        k = self.settings.pass_k
        sampling = SamplingParams(k, self.settings.pass_k_temperature, 1.0, greedy.max_new_tokens)
        share = collectives.share(len(prompts))
        progress = GenerationProgress(len(share) * k, f"held-out pass@{k}") if collectives.rank == 0 else None
        try:
            groups = generate(
                [prompts[i] for i in share], sampling, seed=self.seed + 1 + collectives.rank, progress=progress
            )
        finally:
            if progress is not None:
                progress.close()
        scores = self.verify([r.text for g in groups for r in g], [golds[i] for i, g in zip(share, groups) for _ in g])
        solved = sum(any(scores[i * k : (i + 1) * k]) for i in range(len(groups)))
        correct, solved, count = collectives.sum([sum(scores), solved, len(groups)]).tolist()
        return {f"pass@{k}": solved / count, "sampled_accuracy": correct / (count * k)}


def describe_scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.3f}" for name, value in metrics.items())


def last_due_point(step: int, every: int, per_batch: int) -> int:
    """The step of the last held-out point due by optimizer step `step` (0: none): a point is due after the loader
    batch that reaches or passes a multiple of `every` (GRPO's `per_batch` iterations of a batch can pass one)."""
    for end in range(step - step % per_batch, 0, -per_batch):
        if end // every > (end - per_batch) // every:
            return end
    return 0


def best_point(history: Sequence[dict[str, float]], metric: str) -> dict[str, float] | None:
    """The trained point scoring highest by `metric`, the earliest on a tie (the start is not a trained point)."""
    trained = [point for point in history if point["step"] > 0]
    return max(trained, key=lambda point: point[metric]) if trained else None


def describe_points(history: Sequence[dict[str, float]], start: dict[str, float], keep_best: str | None) -> str | None:
    """One line a reader checks the run by: greedy pass@1 at the start and at every point, the best point and what
    the last one scored against it."""
    if len(history) < 2:
        return None
    points = ([f"start {start['accuracy']:.1%}"] if "accuracy" in start else []) + [
        f"step {point['step']:.0f} {point['accuracy']:.1%}" for point in history
    ]
    line = "held-out pass@1 (greedy): " + ", ".join(points)
    metric = keep_best or "accuracy"
    best = best_point(history, metric)
    last = history[-1]
    if best is None:
        return line
    line += (
        f"; best {metric} {best[metric]:.1%} at step {best['step']:.0f}"
        + (f" (kept in {BEST_EXPORT}/)" if keep_best else "")
        + f", the last step {last['step']:.0f} {last[metric]:.1%}"
    )
    return line


def sample_rows(
    rows: Sequence[dict[str, Any]], groups: Sequence[Sequence[Rollout]], scores: Sequence[float]
) -> list[dict[str, Any]]:
    """One row per sample, in prompt order: what a reader checks first when a score moves."""
    flat = [(row, rollout) for row, group in zip(rows, groups) for rollout in group]
    return [
        {
            "prompt": row["prompt"],
            "completion": rollout.transcript,
            "gold": row[GOLD] if isinstance(row[GOLD], str) else "(tests)",
            "correct": bool(score),
            "finished": rollout.finished,
            "tokens": len(rollout.token_ids),
            **({"tool_calls": len(rollout.calls)} if rollout.turns else {}),
        }
        for (row, rollout), score in zip(flat, scores)
    ]


class HeldOutPoints(Callback):
    """Scores the held-out prompts during training when a point is due (`Stage.heldout_point_if_due`). A callback
    rather than the stage's own hook: Lightning runs callbacks before the stage's hook and checkpoint callbacks last,
    so the checkpoint of a step holds that step's scores and best export, and a resumed run neither repeats nor
    loses a point."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.heldout_point_if_due()
