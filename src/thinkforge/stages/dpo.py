"""DPO against a frozen reference: the stage's starting checkpoint, sharded like the policy, or its log-probs
precomputed once. Pairs come from jsonl (prompt, chosen, rejected) or from the starting model's own rollouts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thinkforge.backbone import CausalLM
from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig
from thinkforge.data.packing import IGNORE_INDEX, TokenSequence
from thinkforge.data.records import GOLD, load_split
from thinkforge.losses import LossSum, dpo_loss_sum
from thinkforge.resume import sampled_rows_path
from thinkforge.rollout.pairs import pair_rollouts
from thinkforge.rollout.settings import SamplingParams
from thinkforge.stage_configs import DPOConfig
from thinkforge.stages.base import Stage
from thinkforge.stages.completions import Batch, completion_scores
from thinkforge.stages.own_samples import sample_once
from thinkforge.stages.probe import StageProbe, TrainingExample, capped, formatted_answer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    split: str
    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


class DPOProbe(StageProbe["DPO"]):
    """A pair's chosen side as the stage builds it (end token, truncation); rollout pairs' replies stand in as the
    gold answers, formatted, since the real ones are sampled at the start of training."""

    def examples(self, count: int) -> list[TrainingExample]:
        stage = self.stage
        if stage.settings.pairs == "file":
            replies = [(record["prompt"], record["chosen"]) for record in stage.pair_records("train")[:count]]
        else:
            replies = [(prompt, formatted_answer(gold)) for prompt, gold in self.gold_rows(count)]
        examples = []
        for prompt, reply in replies:
            prompt_ids = self.chat.encode(self.chat.prompt(prompt))
            completion = list(stage.completion_ids(prompt_ids, reply, True) or ())
            mask = [False] * len(prompt_ids) + [True] * len(completion)
            examples.append(
                TrainingExample(prompt_ids, TokenSequence.causal(prompt_ids + completion, mask), self.chat.turn_end_id)
            )
        return examples

    def sampling(self) -> SamplingParams | None:
        return capped(self.stage.rollout) if self.stage.settings.pairs == "rollout" else None


class DPO(Stage):
    loss_unit = "pairs"
    headline_metrics = (("loss", "loss"), ("rewards/margins", "margin"))
    default_heldout_points = 4

    def __init__(self, run: TrainConfig, chat: ChatFormat) -> None:
        super().__init__(run, chat)
        self.settings: DPOConfig = run.stage
        self.rollout = self.settings.sampling.at()
        self.items_need_model = self.settings.pairs == "rollout"
        self.ref_logps: dict[str, torch.Tensor] = {}  # split -> [pairs, 2] (chosen, rejected) when precomputed

    # ---- data -------------------------------------------------------------------------------------------------
    def pair_records(self, split: str) -> list[dict[str, Any]]:
        data = self.run.data
        if self.settings.pairs == "file":
            return load_split(data, split, required=("prompt", "chosen", "rejected")).rows
        records = load_split(data, split, required=("prompt", GOLD))
        rows = records.rows[: data.max_val_rows] if split == "val" else self.heldout.training_rows(records)
        path = sampled_rows_path(self.run.output_dir, "rollout_pairs", split)
        return sample_once(self, rows, self.rollout, path, pair_rollouts)

    def probe(self) -> DPOProbe:
        return DPOProbe(self)

    def completion_length(self) -> int:
        return self.rollout.max_new_tokens if self.settings.pairs == "rollout" else self.run.data.max_sequence_length

    def build_items(self, split: str) -> Sequence[Pair]:
        items: list[Pair] = []
        dropped = 0
        for record in self.pair_records(split):
            prompt_ids = self.chat.encode(self.chat.prompt(record["prompt"]))
            chosen, rejected = (
                self.completion_ids(prompt_ids, record[side], record.get(f"{side}_finished", True))
                for side in ("chosen", "rejected")
            )
            if chosen is None or rejected is None:
                dropped += 1
                continue
            items.append(Pair(split, len(items), tuple(prompt_ids), chosen, rejected))
        log.info(
            "%s: %d pairs%s", split, len(items), f", {dropped} over data.max_sequence_length dropped" if dropped else ""
        )
        return items

    def completion_ids(self, prompt_ids: list[int], completion: str, finished: bool) -> tuple[int, ...] | None:
        """A finished reply ends with the chat turn's end token, the one SFT trains and generation stops at; the
        prompt and reply together fit data.max_sequence_length (truncated or dropped)."""
        completion_ids = self.chat.reply_ids(completion, finished)
        room = self.run.data.max_sequence_length - len(prompt_ids)
        if len(completion_ids) > room:
            if self.run.data.overflow == "drop" or room <= 0:
                return None
            completion_ids = completion_ids[:room]
        return tuple(completion_ids)

    def collate(self, items: Sequence[Pair]) -> Batch:
        """Pair i's sides are completions 2i (chosen) and 2i + 1 (rejected), packed with their shared prompt."""
        documents = [
            document
            for i, item in enumerate(items)
            for document in self.batcher.layout(
                item.prompt_ids,
                [(2 * i, item.chosen_ids, True), (2 * i + 1, item.rejected_ids, True)],
                self.settings.share_prompt,
            )
        ]
        batch = self.batcher.collate(
            documents, max(self.run.data.max_sequence_length, *(len(document) for document in documents))
        )
        batch["pair_index"] = torch.tensor([item.index for item in items])
        if items[0].split in self.ref_logps:  # precomputed: they travel with their pairs
            batch["ref_logps"] = self.ref_logps[items[0].split][batch["pair_index"]]
        return batch

    def count_units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(len(batch["pair_index"]))

    # ---- reference --------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Rollout pairs are sampled here, where the policy is on its device and still the starting checkpoint
        (both splits: validation comes later, from a trained policy). Reference log-probs are precomputed once
        per fit from the starting checkpoint, so a resumed run gets the very same values."""
        super().on_fit_start()
        datamodule = self.loaded_data
        train_items, val_items = datamodule.train_items, datamodule.val_items
        if self.settings.precompute_ref_logps and not self.ref_logps:
            self.ref_logps = {"train": self._precompute(train_items)}
            if val_items:
                self.ref_logps["val"] = self._precompute(val_items)

    @contextlib.contextmanager
    def starting_model(self) -> Iterator[CausalLM]:
        """To precompute with: with LoRA the policy's base weights, else a temporary copy, freed after the block."""
        if self.run.model.lora.rank:
            with self.reference() as reference:
                yield reference
        else:
            yield self.load_backbone(frozen=True).to(self.device)

    @torch.no_grad()
    def _precompute(self, items: Sequence[Pair]) -> torch.Tensor:
        """Each rank scores an equal share with a temporary reference; the shares are gathered, the model freed."""
        world, rank, micro = self.trainer.world_size, self.trainer.global_rank, self.run.data.micro_batch_size
        per_rank = -(-len(items) // world)
        share = [items[min(i, len(items) - 1)] for i in range(rank * per_rank, (rank + 1) * per_rank)]
        scores = []
        with self.trainer.precision_plugin.forward_context(), self.starting_model() as reference:
            for start in range(0, len(share), micro):
                batch = {k: v.to(self.device) for k, v in self.collate(share[start : start + micro]).items()}
                scores.append(self._sequence_logps(reference, batch))
        gathered = self.trainer.strategy.all_gather(torch.cat(scores))
        return gathered.reshape(-1, 2)[: len(items)].cpu()

    # ---- loss -------------------------------------------------------------------------------------------------
    def _sequence_logps(self, model: CausalLM, batch: Batch) -> torch.Tensor:
        """Summed log-probs of each pair's sides, [pairs, 2] (chosen, rejected)."""
        logprobs, _ = completion_scores(model, batch)
        return logprobs.sum(-1).view(-1, 2)

    def loss_sum(self, batch: Batch) -> LossSum:
        chosen, rejected = self._sequence_logps(self.policy, batch).unbind(-1)
        if self.settings.precompute_ref_logps:
            ref_chosen, ref_rejected = batch["ref_logps"].to(chosen).unbind(-1)
        else:
            with self.reference() as reference:
                ref_chosen, ref_rejected = self._sequence_logps(reference, batch).unbind(-1)
        chosen_tokens = (batch["targets"] != IGNORE_INDEX).sum(-1).view(-1, 2)[:, 0]
        return dpo_loss_sum(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.settings.beta,
            loss_type=self.settings.loss_type,
            label_smoothing=self.settings.label_smoothing,
            rpo_alpha=self.settings.rpo_alpha,
            chosen_tokens=chosen_tokens,
        )
