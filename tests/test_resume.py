"""The resume module's own pieces; the kill/resume runs of every stage are in their stages' tests."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from thinkforge.resume import ResumeState, data_position, read_sampled_rows, sampled_rows_path, write_sampled_rows


def test_the_extra_state_a_checkpoint_carries_comes_back_into_a_fresh_stage():
    trained = SimpleNamespace(initial_heldout={"accuracy": 0.25}, steps_without_signal=3, policy="not kept")
    checkpoint: dict = {}
    ResumeState().on_save_checkpoint(None, trained, checkpoint)
    assert checkpoint["thinkforge"] == {"initial_heldout": {"accuracy": 0.25}, "steps_without_signal": 3}
    fresh = SimpleNamespace(initial_heldout={}, steps_without_signal=0)
    ResumeState().on_load_checkpoint(None, fresh, checkpoint)
    assert fresh.initial_heldout == {"accuracy": 0.25} and fresh.steps_without_signal == 3
    sft = SimpleNamespace(initial_heldout={})  # a stage without the GRPO counter ignores it
    ResumeState().on_load_checkpoint(None, sft, checkpoint)
    assert not hasattr(sft, "steps_without_signal")


def test_objects_travel_as_their_state_dict_and_come_back_into_the_fresh_stages_own():
    import torch

    from thinkforge.stages.watch import EntropyCollapseWatch

    watch = EntropyCollapseWatch()
    for step in range(12):
        watch.update(step, 0.2 - 0.01 * step, 0.5)
    trained = SimpleNamespace(collapse_watch=watch, heldout_history=[{"step": 8, "accuracy": 0.5}])
    checkpoint: dict = {}
    ResumeState().on_save_checkpoint(None, trained, checkpoint)
    # plain values: a checkpoint loads with torch.load(weights_only=True)
    path = Path(tempfile.mkdtemp()) / "state.pt"
    torch.save(checkpoint, path)
    checkpoint = torch.load(path, weights_only=True)
    fresh = SimpleNamespace(collapse_watch=EntropyCollapseWatch(), heldout_history=[])
    ResumeState().on_load_checkpoint(None, fresh, checkpoint)
    assert fresh.collapse_watch.state_dict() == watch.state_dict() and fresh.heldout_history == trained.heldout_history


def test_data_position_counts_loader_batches():
    assert [data_position(step, 1) for step in (0, 1, 5)] == [0, 1, 5]
    assert [data_position(step, 2) for step in (0, 1, 2, 5)] == [0, 0, 1, 2]


def test_rollout_pairs_are_read_back_and_a_resume_without_them_stops(tmp_path):
    path = sampled_rows_path(str(tmp_path), "rollout_pairs", "train")
    assert read_sampled_rows(path, global_step=0) is None, "a fresh run samples them"
    with pytest.raises(RuntimeError, match="cannot sample its rows from the starting checkpoint again"):
        read_sampled_rows(path, global_step=4)
    write_sampled_rows(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert read_sampled_rows(path, global_step=4) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert not path.with_suffix(".partial").exists()
