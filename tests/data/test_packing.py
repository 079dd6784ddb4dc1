"""Packing: best-fit-decreasing bins, overflow handling, and packed rows that behave like documents run alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from thinkforge.backbone import CausalLM
from thinkforge.data.packing import (
    IGNORE_INDEX,
    TokenSequence,
    best_fit_decreasing,
    collate_rows,
    fill_ratio,
    fit_to_length,
    pack,
)


def doc(length: int, start: int = 1) -> TokenSequence:
    return TokenSequence.causal(list(range(start, start + length)))


def test_best_fit_decreasing_by_hand():
    # Sorted: 6,5,4,3,2 into capacity 10. 6->A(4 free); 5->B(5); 4->A(0, best fit); 3->B(2); 2->B(0).
    assert best_fit_decreasing([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]


def test_every_sequence_lands_once_within_capacity():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (500,), generator=generator).tolist()
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(index for b in bins for index in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (len(bins) * 128) > 0.95


def test_overflow_split_truncate_drop_are_counted():
    sequences = [doc(5), doc(12)]
    split, counts = fit_to_length(sequences, 5, "split")
    assert [len(s) for s in split] == [5, 5, 5, 2] and counts == {"split": 1}
    truncated, counts = fit_to_length(sequences, 5, "truncate")
    assert [len(s) for s in truncated] == [5, 5] and counts == {"truncated": 1}
    dropped, counts = fit_to_length(sequences, 5, "drop")
    assert [len(s) for s in dropped] == [5] and counts == {"dropped": 1}


def test_causal_labels_and_loss_mask():
    sequence = TokenSequence.causal([10, 11, 12, 13], loss_mask=[False, False, True, True])
    assert sequence.labels == (IGNORE_INDEX, 12, 13, IGNORE_INDEX)


def test_collate_restarts_positions_and_never_labels_across_documents():
    rows = [[doc(3, 1), doc(2, 50)], [doc(4, 80)]]
    batch = collate_rows(rows, pad_id=0, row_length=6, flatten=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 50, 51], [80, 81, 82, 83, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[2, 3, -100, 51, -100], [81, 82, 83, -100, -100]]
    assert int(batch["num_tokens"]) == 9 and int(batch["num_slots"]) == 12
    flat = collate_rows(rows, pad_id=0, row_length=6, flatten=True)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 50, 51, 80, 81, 82, 83]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert fill_ratio(rows, 6) == pytest.approx(9 / 12)


def test_packed_rows_equal_documents_run_alone():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), logprob_chunk_size=7).eval()
    documents = [TokenSequence.causal(torch.randint(0, 97, (n,)).tolist()) for n in (9, 17, 5, 30, 12, 21)]
    rows = pack(documents, 40)
    assert any(len(row) > 1 for row in rows)
    batch = collate_rows(rows, pad_id=0, row_length=40, flatten=False)
    with torch.no_grad():
        packed, _ = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        for row_index, row in enumerate(rows):
            cursor = 0
            for document in row:
                alone, _ = model(torch.tensor([document.input_ids]), torch.tensor([document.labels]))
                torch.testing.assert_close(
                    packed[row_index, cursor : cursor + len(document)], alone[0], atol=1e-5, rtol=0
                )
                cursor += len(document)
