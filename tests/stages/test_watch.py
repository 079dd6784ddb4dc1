import random

from thinkforge.stages.watch import EntropyCollapseWatch

STEPS = 40


def sagging(step: int) -> float:
    """Issue 41's pattern: the reward climbs 0.31 -> 0.77 by step 10, then sags to 0.6 by step 40."""
    return 0.31 + 0.046 * step if step <= 10 else 0.77 - 0.17 * (step - 10) / 30


def holding(step: int) -> float:
    return min(0.6, 0.3 + 0.05 * step)


FALLING_ENTROPY = [0.18 - 0.13 * step / (STEPS - 1) for step in range(STEPS)]  # 0.18 -> 0.05
LEARNING_ENTROPY = [0.18 * (0.3 + 0.7 * 0.9**step) for step in range(STEPS)]  # settles at a third of its start


def warnings(watch, entropies, rewards):
    return [(step, text) for step, (e, r) in enumerate(zip(entropies, rewards)) if (text := watch.update(step, e, r))]


def test_the_collapse_of_issue_41_is_named_once_with_its_knobs():
    [(step, message)] = warnings(EntropyCollapseWatch(), FALLING_ENTROPY, [sagging(s) for s in range(STEPS)])
    assert 20 < step < STEPS
    for knob in ("optim.lr", "optim.min_lr_ratio", "stage.beta", "stage.epsilon_high", "stage.top_entropy_quantile"):
        assert knob in message
    assert "heldout.keep_best" in message


def test_the_sag_is_found_through_moderate_noise():
    noise = random.Random(2)
    runs = [[sagging(s) + noise.gauss(0, 0.05) for s in range(STEPS)] for _ in range(200)]
    found = sum(bool(warnings(EntropyCollapseWatch(), FALLING_ENTROPY, rewards)) for rewards in runs)
    assert found >= 0.9 * len(runs), found


def test_a_noisy_reward_that_holds_its_level_is_not_called_a_collapse():
    """A step's reward is the mean of 64 samples in the demo (noise about 0.13 from step to step): its best 10-step
    mean sits about 0.08 above its level by chance, which a fixed 10% threshold would call a fall in most runs."""
    noise = random.Random(0)
    runs = [[holding(s) + noise.gauss(0, 0.13) for s in range(STEPS)] for _ in range(200)]
    warned = sum(bool(warnings(EntropyCollapseWatch(), LEARNING_ENTROPY, rewards)) for rewards in runs)
    assert warned <= 0.1 * len(runs), warned


def test_a_falling_reward_with_its_entropy_intact_is_not_called_a_collapse():
    assert warnings(EntropyCollapseWatch(), [0.2] * STEPS, [0.8 - 0.01 * s for s in range(STEPS)]) == []


def test_held_out_points_below_the_best_show_the_fall_the_noisy_reward_hides():
    watch = EntropyCollapseWatch()
    noise = random.Random(1)
    rewards = [holding(s) + noise.gauss(0, 0.13) for s in range(STEPS)]
    assert warnings(watch, FALLING_ENTROPY, rewards) == []
    assert watch.heldout_point(8, 0.652) is None and watch.heldout_point(24, 0.702) is None
    assert watch.heldout_point(28, 0.690) is None, "within 2 points of the best"
    message = watch.heldout_point(32, 0.652)
    assert message and "held-out pass@1 fell from 70.2% (step 24) to 65.2%" in message
    assert watch.heldout_point(36, 0.60) is None, "once per run"


def test_a_resumed_watch_continues_where_it_stopped():
    rewards = [sagging(s) for s in range(STEPS)]
    whole = warnings(EntropyCollapseWatch(), FALLING_ENTROPY, rewards)
    first = EntropyCollapseWatch()
    warnings(first, FALLING_ENTROPY[:15], rewards[:15])
    resumed = EntropyCollapseWatch()
    resumed.load_state_dict(first.state_dict())
    later = [(15 + s, text) for s, text in warnings(resumed, FALLING_ENTROPY[15:], rewards[15:])]
    assert [step for step, _ in later] == [step for step, _ in whole]
