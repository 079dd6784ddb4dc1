"""Rows a stage samples from its own starting checkpoint before it trains: rollout DPO's pairs and rejection-sampled
SFT's replies. Sampled once, verified, and kept in the run directory, where a resumed run reads them back instead
of sampling weights that have trained since."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from thinkforge.chat import ChatFormat
from thinkforge.collectives import Collectives
from thinkforge.config import TrainConfig
from thinkforge.progress import GenerationProgress
from thinkforge.resume import read_sampled_rows, write_sampled_rows
from thinkforge.rewards.grading import Gold, verify_many
from thinkforge.rollout.base import Rollout
from thinkforge.rollout.pairs import graded
from thinkforge.rollout.settings import SamplingParams

log = logging.getLogger(__name__)

#: (groups, prompts, golds, which samples are correct, prompt indices, provenance) -> (rows, counts)
Select = Callable[..., tuple[list[dict[str, Any]], Counter[str]]]


class SamplingStage(Protocol):
    """What `sample_once` reads of a stage (a `Stage`, which imports this module)."""

    run: TrainConfig
    chat: ChatFormat
    trainer: Any

    @property
    def global_step(self) -> int: ...

    @property
    def collectives(self) -> Collectives: ...

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        seed: int,
        progress: GenerationProgress | None = None,
    ) -> list[list[Rollout]]: ...


def sample_once(
    stage: SamplingStage, rows: Sequence[dict[str, Any]], sampling: SamplingParams, path: Path, select: Select
) -> list[dict[str, Any]]:
    """Every rank samples its share of `rows` (prompt + gold) with the policy, still the starting checkpoint, and
    grades them as the stage reads answers; `select` turns them into training rows; rank 0 writes all of them to
    `path`, ordered by prompt, whatever the number of ranks."""
    already = read_sampled_rows(path, stage.global_step)
    if already is not None:
        return already
    share = stage.collectives.share(len(rows))
    rank = stage.trainer.global_rank
    prompts = [rows[i]["prompt"] for i in share]
    golds: list[Gold] = [rows[i]["gold"] for i in share]
    progress = GenerationProgress(len(share) * sampling.num_samples, path.stem) if rank == 0 else None
    try:
        groups = stage.generate(
            [stage.chat.prompt(p) for p in prompts], sampling, seed=stage.run.seed + rank, progress=progress
        )
    finally:
        if progress is not None:
            progress.close()
    lenient = stage.run.stage.reads_stated_answers()
    correct = graded(groups, golds, lambda texts, golds: verify_many(texts, golds, lenient=lenient, guess=False))
    provenance = {
        "source_model": stage.run.model.name_or_path or "model.config",
        "temperature": sampling.temperature,
        "seed": stage.run.seed + rank,
        "rank": rank,
    }
    selected, counts = select(groups, prompts, golds, correct, prompt_indices=share, provenance=provenance)
    gathered = stage.collectives.gather((selected, counts))
    selected = sorted(
        (row for rank_rows, _ in gathered for row in rank_rows), key=lambda row: row["provenance"]["prompt_index"]
    )
    counts = sum((rank_counts for _, rank_counts in gathered), Counter())
    if not selected:
        raise RuntimeError(f"{path.stem}: no prompt gave a row to train on ({dict(counts)})")
    if stage.trainer.is_global_zero:
        sampled = len(share) * len(gathered)
        log.info("%s: %d prompts sampled on %d ranks -> %s", path.name, sampled, len(gathered), dict(counts))
        write_sampled_rows(path, selected)
    stage.trainer.strategy.barrier(path.stem)
    return selected
