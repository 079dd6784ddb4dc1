"""Held-out scores of a stage's policy, before and after it trains: greedy pass@1, EOS rate and mean length on
`heldout.num_prompts` prompts, and pass@k with the sampled pass@1 at `heldout.pass_k_temperature` when asked."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from thinkforge.chat import ChatFormat
from thinkforge.collectives import Collectives
from thinkforge.config import DataConfig, HeldOutConfig, StageSchema
from thinkforge.data.records import GOLD, DataError, Records, load_split
from thinkforge.metrics import HeldOutSums, score_rollouts
from thinkforge.progress import GenerationProgress
from thinkforge.rewards.grading import Gold, verify_many
from thinkforge.rollout.base import Rollout
from thinkforge.rollout.settings import SamplingParams

log = logging.getLogger(__name__)


class Generate(Protocol):
    def __call__(
        self,
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]:
        """This rank's prompts, sampled."""


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
        """Scores measured outside a training step (before and after the stage), written straight to every logger
        at the current step: Lightning's `self.log` is closed in the hooks they are measured in."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({prefix + name: value for name, value in metrics.items()}, step=trainer.global_step)
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

    def prompts(self) -> tuple[list[str], list[Gold]]:
        """Held-out prompts rendered for generation, and their gold answers: data.val's first, or the training
        rows held out from training."""
        count = self.settings.num_prompts
        if self.cuts_from_train():
            rows = load_split(self.data, "train", required=("prompt", GOLD)).rows[-count:]
        else:
            rows = load_split(self.data, "val", required=("prompt", GOLD)).rows[:count]
        return [self.chat.prompt(row["prompt"]) for row in rows], [row[GOLD] for row in rows]

    def evaluate(
        self, generate: Generate, collectives: Collectives, completion_length: int, *, filename: str | None
    ) -> dict[str, float]:
        """Every rank scores its share; rank 0 writes `filename` in the run directory (None: write nothing)."""
        sampling = self.sampling(completion_length)
        prompts, golds = self.prompts()
        share = collectives.share(len(prompts))
        progress = GenerationProgress(len(share) * sampling.num_samples, "held-out") if collectives.rank == 0 else None
        try:
            groups = generate(
                [prompts[i] for i in share], sampling, seed=self.seed + collectives.rank, progress=progress
            )
        finally:
            if progress is not None:
                progress.close()
        sums = score_rollouts(groups, [golds[i] for i in share], self.verify)
        total = HeldOutSums(*collectives.sum(sums.as_list()).tolist())
        metrics = total.metrics()
        if self.settings.pass_k:
            count = self.settings.pass_k_prompts
            metrics.update(self.pass_at_k(prompts[:count], golds[:count], generate, collectives, sampling))
        if collectives.rank == 0 and filename:
            (self.output_dir / filename).write_text(json.dumps({**metrics, "samples": total.samples}, indent=2))
            log.info("held-out: %s", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
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
