"""Rollouts sampled ahead of the trainer: which positions are sampled when, and what a checkpoint keeps of them."""

from __future__ import annotations

import threading

import pytest

from thinkforge.rollout.ahead import KEPT_SAVES, RolloutsAhead, SampledBatch
from thinkforge.rollout.settings import SamplingParams


class Sampler:
    """Records the positions it is asked for, with the weights' version at the time."""

    def __init__(self) -> None:
        self.version = 0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, position: int) -> SampledBatch:
        self.calls.append((position, self.version))
        return SampledBatch(position, [], {"version": float(self.version)}, SamplingParams(), seconds=0.5)


def run_steps(ahead: RolloutsAhead, sampler: Sampler, positions: range) -> list[float]:
    """Trains `positions` one after the other; the version each step's batch was sampled at."""
    versions = []
    for position in positions:
        batch, _ = ahead.take(position)
        versions.append(batch.stats["version"])
        ahead.done(position)
        sampler.version += 1
    return versions


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_each_position_is_sampled_once_by_the_weights_of_max_staleness_steps_before(staleness):
    sampler = Sampler()
    versions = run_steps(RolloutsAhead(staleness, sampler), sampler, range(6))
    assert versions == [max(0, position - staleness) for position in range(6)]
    assert [position for position, _ in sampler.calls] == list(range(6 + staleness))


def test_a_batch_is_kept_until_done_and_nothing_past_the_final_position_is_sampled():
    sampler = Sampler()
    ahead = RolloutsAhead(2, sampler, final_position=3)
    ahead.take(0)
    ahead.take(0)
    assert sampler.calls == [(0, 0), (1, 0), (2, 0)], "a step taken again (stopped inside, resumed) samples nothing"
    ahead.done(0)
    ahead.take(1)
    assert sorted(ahead.batches) == [1, 2, 3]
    ahead.done(1)
    ahead.take(2)
    assert sorted(ahead.batches) == [2, 3], "the run ends at position 3"


class BackgroundSampler(Sampler):
    """Readies the engine in the caller's thread (the weights' version then) and samples in another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[tuple[int, str]] = []
        self.readied: list[int] = []

    def start(self):
        version = self.version
        self.readied.append(version)

        def sample(position: int) -> SampledBatch:
            self.threads.append((position, threading.current_thread().name))
            self.calls.append((position, version))
            return SampledBatch(position, [], {"version": float(version)}, SamplingParams(), seconds=0.5)

        return sample


@pytest.mark.parametrize("staleness", [1, 2])
def test_in_the_background_the_last_position_ahead_is_sampled_while_the_trainer_trains_with_the_same_results(
    staleness,
):
    plain = Sampler()
    expected = run_steps(RolloutsAhead(staleness, plain, final_position=7), plain, range(8))
    sampler = BackgroundSampler()
    ahead = RolloutsAhead(staleness, sampler, start_in_background=sampler.start, final_position=7)
    assert run_steps(ahead, sampler, range(8)) == expected
    assert sorted(sampler.calls) == sorted(plain.calls), "every position once, by the same weights"
    background = [position for position, thread in sampler.threads if thread != threading.current_thread().name]
    assert background == list(range(staleness, 8)), "all but the first ones, sampled before the first step"


def test_a_save_waits_for_the_sampling_in_the_background_and_keeps_it(tmp_path):
    sampler = BackgroundSampler()
    ahead = RolloutsAhead(1, sampler, start_in_background=sampler.start)
    ahead.take(0)
    ahead.save(tmp_path, step=0, rank=0)
    resumed = RolloutsAhead(1, Sampler())
    resumed.load(tmp_path, step=0, rank=0)
    assert sorted(resumed.batches) == [0, 1]


def test_an_error_in_the_background_is_raised_in_the_trainers_thread():
    def failing_start():
        def sample(position):
            raise RuntimeError(f"the server died sampling position {position}")

        return sample

    ahead = RolloutsAhead(1, Sampler(), start_in_background=failing_start)
    ahead.take(0)
    ahead.done(0)
    with pytest.raises(RuntimeError, match="the server died sampling position 1"):
        ahead.take(1)


def test_a_checkpoint_keeps_the_held_batches_and_a_resume_trains_on_them(tmp_path):
    sampler = Sampler()
    ahead = RolloutsAhead(2, sampler)
    run_steps(ahead, sampler, range(3))
    ahead.save(tmp_path, step=3, rank=1)
    resumed_sampler = Sampler()
    resumed_sampler.version = 3
    resumed = RolloutsAhead(2, resumed_sampler)
    resumed.load(tmp_path, step=3, rank=1)
    assert run_steps(resumed, resumed_sampler, range(3, 6)) == [1.0, 2.0, 3.0]
    assert run_steps(ahead, sampler, range(3, 6)) == [1.0, 2.0, 3.0], "the same as the run that went on"


def test_a_resume_without_the_saved_rollouts_stops_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"step4_rank0\.pt is missing.*max_staleness=1"):
        RolloutsAhead(1, Sampler()).load(tmp_path, step=4, rank=0)


def test_only_the_newest_saves_of_each_rank_are_kept_and_on_policy_runs_write_none(tmp_path):
    ahead = RolloutsAhead(1, Sampler())
    for step in (2, 4, 10, 12):
        ahead.save(tmp_path, step, rank=0)
    ahead.save(tmp_path, 2, rank=1)
    kept = sorted(path.name for path in tmp_path.iterdir())
    assert KEPT_SAVES == 2 and kept == ["step10_rank0.pt", "step12_rank0.pt", "step2_rank1.pt"]
    on_policy = tmp_path / "on_policy"
    RolloutsAhead(0, Sampler()).save(on_policy, 2, rank=0)
    assert not on_policy.exists()
