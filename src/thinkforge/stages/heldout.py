"""Held-out scores of a stage's policy, before and after it trains: greedy pass@1, EOS rate and mean length on
`heldout.num_prompts` prompts, and pass@k with the sampled pass@1 at `heldout.pass_k_temperature` when asked."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from thinkforge.collectives import Collectives
from thinkforge.config import TrainConfig
from thinkforge.data.records import GOLD, DataError, Records, load_split
from thinkforge.metrics import HeldOutSums, score_rollouts
from thinkforge.rewards.grading import Gold, verify_many
from thinkforge.rollout import Rollout, SamplingConfig

log = logging.getLogger(__name__)


class Generate(Protocol):
    def __call__(self, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int) -> list[list[Rollout]]:
        """This rank's prompts, sampled."""


class HeldOut:
    """`trains_on_answers`: the stage's training rows carry gold answers (prompt + answer), so held-out prompts can
    be cut from them when data.val is null. `lenient`: the stage grades stated answers; held-out scores read them
    too, or they would grade another format than the one the stage trains (both from the stage's schema)."""

    def __init__(self, run: TrainConfig, render_prompt: Callable[[str], str]) -> None:
        self.run, self.settings, self.render_prompt = run, run.heldout, render_prompt
        self.trains_on_answers, self.lenient = run.stage.trains_on_answers(), run.stage.reads_stated_answers()

    def warn_when_missing(self, stage_name: str) -> None:
        if self.settings.num_prompts and not self.enabled():
            log.warning(
                "no held-out scores: data.val is null and %s's rows carry no gold answers; set data.val to a "
                "prompt + answer file, or heldout.num_prompts=0",
                stage_name,
            )

    def max_new_tokens(self, completion_length: int) -> int:
        """heldout.max_new_tokens, or as long as the stage's own completions may be."""
        return self.settings.max_new_tokens or completion_length

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
        return self.run.data.val is None and self.settings.num_prompts > 0 and self.trains_on_answers

    def enabled(self) -> bool:
        return bool(self.settings.num_prompts) and (self.run.data.val is not None or self.cuts_from_train())

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
            rows = load_split(self.run.data, "train", required=("prompt", GOLD)).rows[-count:]
        else:
            rows = load_split(self.run.data, "val", required=("prompt", GOLD)).rows[:count]
        return [self.render_prompt(row["prompt"]) for row in rows], [row[GOLD] for row in rows]

    def evaluate(
        self, generate: Generate, collectives: Collectives, completion_length: int, *, filename: str | None
    ) -> dict[str, float]:
        """Every rank scores its share; rank 0 writes `filename` in the run directory (None: write nothing)."""
        max_new_tokens = self.max_new_tokens(completion_length)
        prompts, golds = self.prompts()
        settings = self.settings
        sampling = SamplingConfig(settings.num_samples, settings.temperature, settings.top_p, max_new_tokens)
        share = collectives.share(len(prompts))
        groups = generate([prompts[i] for i in share], sampling, seed=self.run.seed + collectives.rank)
        sums = score_rollouts(groups, [golds[i] for i in share], self.verify)
        total = HeldOutSums(*collectives.sum(sums.as_list()).tolist())
        metrics = total.metrics()
        if settings.pass_k:
            count = settings.pass_k_prompts
            metrics.update(self.pass_at_k(prompts[:count], golds[:count], generate, collectives, max_new_tokens))
        if collectives.rank == 0 and filename:
            (Path(self.run.output_dir) / filename).write_text(
                json.dumps({**metrics, "samples": total.samples}, indent=2)
            )
            log.info("held-out: %s", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    def pass_at_k(
        self, prompts: list[str], golds: list[Gold], generate: Generate, collectives: Collectives, max_new_tokens: int
    ) -> dict[str, float]:
        """pass@k (a prompt counts when any of its k samples is right) and the sampled pass@1 at that temperature."""
        k = self.settings.pass_k
        sampling = SamplingConfig(k, self.settings.pass_k_temperature, 1.0, max_new_tokens)
        share = collectives.share(len(prompts))
        groups = generate([prompts[i] for i in share], sampling, seed=self.run.seed + 1 + collectives.rank)
        scores = self.verify([r.text for g in groups for r in g], [golds[i] for i, g in zip(share, groups) for _ in g])
        solved = sum(any(scores[i * k : (i + 1) * k]) for i in range(len(groups)))
        correct, solved, count = collectives.sum([sum(scores), solved, len(groups)]).tolist()
        return {f"pass@{k}": solved / count, "sampled_accuracy": correct / (count * k)}
