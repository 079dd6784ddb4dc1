"""Split invariance: the same global batch gives the same loss and gradient however it is cut, into micro-batches,
packed rows or ranks. A gap means the loss is averaged per piece, not over the batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.config import TrainConfig, validate
from thinkforge.data.packing import TokenSequence, collate_rows, pack
from thinkforge.doctor.findings import Finding
from thinkforge.doctor.runs import first_step, relative_gap
from thinkforge.losses import causal_lm_loss
from thinkforge.stages.probe import StageProbe

SPLIT_TOLERANCE = 1e-5


def check_micro_batches(cfg: DictConfig, workdir: Path) -> Finding:
    """One micro-batch per rank vs the smallest micro-batches: the same global batch, the same loss and gradient."""
    run = validate(cfg)
    world = run.hardware.devices * run.hardware.num_nodes
    whole = run.data.batch_size // world
    if whole == 1:
        return Finding("split: micro-batches", "skip", "one sample per rank: nothing to split")
    one = first_step(cfg, workdir / "split_one", f"data.micro_batch_size={whole}")
    many = first_step(cfg, workdir / "split_many", "data.micro_batch_size=1")
    if one["grad_norm"] == 0 and many["grad_norm"] == 0:
        return Finding(
            "split: micro-batches",
            "warn",
            "the first step has no gradient (for RL: no group with a reward spread)",
            "nothing to compare; run the doctor from a checkpoint that already solves some prompts",
        )
    gap = relative_gap(many, one)
    measured = (
        f"1 x {whole} vs {whole} x 1 per rank: loss {one['loss']:.6g} / {many['loss']:.6g}, relative gap {gap:.1e}"
    )
    if gap > SPLIT_TOLERANCE:
        return Finding(
            "split: micro-batches",
            "fail",
            measured,
            "the loss is not the global mean: gradient accumulation weights micro-batches unequally",
        )
    return Finding("split: micro-batches", "pass", measured)


def packed_vs_unpacked(model: CausalLM, documents: Sequence[TokenSequence], row_length: int, pad_id: int) -> float:
    """Relative gap of the token-mean loss and its gradient norm between packed rows and one document per row."""
    results = []
    for rows in (pack(documents, row_length), [[document] for document in documents]):
        model.zero_grad(set_to_none=True)
        batch = collate_rows(rows, pad_id, row_length=row_length, flatten=False)
        logprobs, _ = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        loss = causal_lm_loss(logprobs, batch["labels"]).mean()
        loss.backward()
        squares = [(p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None]
        results.append({"loss": float(loss.detach()), "grad_norm": float(torch.stack(squares).sum().sqrt())})
    model.zero_grad(set_to_none=True)
    return relative_gap(results[0], results[1])


def check_packing(probe: StageProbe[Any], run: TrainConfig, documents: Sequence[TokenSequence]) -> Finding:
    model = CausalLM(load_hf_model(run.model, probe.chat, param_dtype=torch.float32), run.model.logprob_chunk_size)
    gap = packed_vs_unpacked(model, documents, run.data.max_sequence_length, probe.chat.pad_id)
    measured = f"{len(documents)} documents: relative gap of loss and gradient norm {gap:.1e}"
    if gap > SPLIT_TOLERANCE:
        return Finding(
            "split: packed vs unpacked",
            "fail",
            measured,
            "packed documents attend to each other: the attention backend ignores position_ids",
        )
    return Finding("split: packed vs unpacked", "pass", measured)


def check_ranks(cfg: DictConfig, run: TrainConfig, probe: StageProbe[Any], workdir: Path) -> Finding:
    if probe.samples_per_rank:
        return Finding("split: ranks", "skip", "each rank samples its own rollouts: another split samples other ones")
    sharded = first_step(cfg, workdir / "ranks_all")
    alone = first_step(
        cfg, workdir / "ranks_one", "hardware.strategy=single", "hardware.devices=1", "hardware.num_nodes=1"
    )
    gap = relative_gap(sharded, alone)
    world = run.hardware.devices * run.hardware.num_nodes
    measured = f"{world} ranks vs 1: relative gap {gap:.1e}"
    if gap > SPLIT_TOLERANCE:
        return Finding("split: ranks", "fail", measured, "the loss is averaged per rank, not over the global batch")
    return Finding("split: ranks", "pass", measured)
