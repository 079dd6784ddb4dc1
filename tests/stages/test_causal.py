"""Unpacked rows (SFT's default) are padded to their micro-batch's longest sequence, not to
data.max_sequence_length, and
`data.group_by_length` puts neighbours in length into one micro-batch without changing what a step trains on."""

from __future__ import annotations

import json
import random

import pytest
from conftest import compose_config, logged, run_cli

from thinkforge.chat import ChatFormat
from thinkforge.config import validate
from thinkforge.data.loader import StepBatches
from thinkforge.data.packing import TokenSequence, collate_rows
from thinkforge.stages.sft import SFT


def mixed_length_chats(path, count=96, seed=0):
    """Replies of 2 to 60 sums: conversations from about 40 to 330 tokens with the built-in tokenizer."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            steps = rng.randint(2, 60)
            reply = " ".join(f"{rng.randint(1, 9)} + {rng.randint(1, 9)}" for _ in range(steps))
            handle.write(
                json.dumps({"prompt": f"Add {steps} pairs.", "completion": f"{reply} \\boxed{{{steps}}}"}) + "\n"
            )
    return path


def test_unpacked_rows_pad_to_the_longest_rounded_up():
    documents = [[TokenSequence.causal(list(range(1, n + 1)))] for n in (5, 11, 3)]
    batch = collate_rows(documents, pad_id=0, row_length=None, flatten=False, pad_multiple=8)
    assert batch["input_ids"].shape == (3, 16)
    assert int(batch["num_tokens"]) == 19 and int(batch["num_slots"]) == 48
    assert batch["position_ids"][0].tolist()[:7] == [0, 1, 2, 3, 4, 0, 1]  # the padding is a document of its own


def sft_batches(tmp_path, *overrides, world_size=1, rank=0):
    data = mixed_length_chats(tmp_path / "chats.jsonl")
    run = validate(
        compose_config(
            "stage=sft",
            "data=jsonl",
            f"data.train={data}",
            "data.max_sequence_length=1024",
            "data.batch_size=16",
            "data.micro_batch_size=4",
            *overrides,
            output_dir=tmp_path,
        )
    )
    stage = SFT(run, ChatFormat(build_tokenizer(), run.data.system_prompt))
    items = stage.build_items("train")
    lengths = [stage.item_length(item) for item in items] if run.data.group_by_length else None
    return (
        stage,
        items,
        StepBatches(
            items,
            batch_size=16,
            micro_batch_size=4,
            collate=stage.collate,
            seed=0,
            rank=rank,
            world_size=world_size,
            start_step=0,
            lengths=lengths,
        ),
    )


def build_tokenizer():
    from thinkforge.tokenizer import build_synthetic_tokenizer

    return build_synthetic_tokenizer()


@pytest.mark.parametrize("group, floor", [(False, 0.5), (True, 0.8)])
def test_unpacked_sft_fill_ratio_on_mixed_lengths(tmp_path, group, floor):
    _, items, batches = sft_batches(tmp_path, f"data.group_by_length={str(group).lower()}")
    lengths = [sum(len(s) for s in item) for item in items]
    assert min(lengths) < 60 and max(lengths) > 300  # the lengths really are mixed
    tokens = slots = 0
    for step in range(6):
        for batch in batches.rank_batch(step):
            tokens += int(batch["num_tokens"])
            slots += int(batch["num_slots"])
    assert tokens / slots >= floor, tokens / slots


def test_grouping_keeps_each_step_and_balances_the_ranks(tmp_path):
    _, _, plain = sft_batches(tmp_path)
    ranks = [sft_batches(tmp_path, "data.group_by_length=true", world_size=2, rank=r)[2] for r in (0, 1)]
    for step in range(4):
        shares = [batches.rank_micro_batches(step) for batches in ranks]
        assert [len(share) for share in shares] == [2, 2]  # every rank runs as many micro-batches
        assert all(len(micro) == 4 for share in shares for micro in share)
        grouped = sorted(index for share in shares for micro in share for index in micro)
        assert grouped == sorted(plain.global_indices(step))  # the same global batch, only regrouped
        # and a resumed stream (built at a later step) serves the same micro-batches
        assert ranks[0].rank_micro_batches(step) == shares[0]


def test_the_documented_sft_command_logs_a_fill_ratio_above_half(tmp_path):
    data = mixed_length_chats(tmp_path / "chats.jsonl")
    result = run_cli(
        "stage=sft",
        "data=jsonl",
        f"data.train={data}",
        "data.batch_size=16",
        "data.micro_batch_size=4",
        "trainer.max_steps=3",
        "heldout.num_prompts=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fill = logged(tmp_path / "run", "train/fill_ratio")
    assert len(fill) == 3 and min(fill.values()) >= 0.5, fill
