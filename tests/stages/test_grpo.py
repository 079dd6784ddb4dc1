"""GRPO stage end to end, reward shaping by hand, schedules, dynamic sampling."""

from __future__ import annotations

import math

import pytest
from conftest import FAST, compose_config, logged, run_cli

from thinkforge.errors import ConfigError
from thinkforge.rewards.shaping import (
    RewardModel,
    Sample,
    cosine_length_reward,
    format_reward,
    overlong_reward,
    repetition_reward,
)
from thinkforge.rollout.settings import check_schedule, scheduled
from thinkforge.training import run_stage

RIGHT = "<think>\n2 + 2 = 4\n</think>\nThe answer is \\boxed{4}."
WRONG = "<think>\n2 + 2 = 5\n</think>\nThe answer is \\boxed{5}."

GRPO_FAST = [
    *FAST,
    "experiment=demo_grpo",
    "stage.sampling.num_samples=4",
    "stage.sampling.max_new_tokens=24",
    "data.batch_size=4",
    "data.micro_batch_size=2",
    "heldout.num_prompts=4",
    "heldout.sampling.max_new_tokens=24",
]


def test_cosine_length_reward_by_hand():
    lengths = dict(positive_fraction=0.5, negative_fraction=0.2)
    assert cosine_length_reward(Sample(RIGHT, "4", 10, False, True, 100), **lengths) == 1.0
    assert cosine_length_reward(Sample(RIGHT, "4", 75, False, True, 100), **lengths) == pytest.approx(0.75)
    assert cosine_length_reward(Sample(RIGHT, "4", 100, False, True, 100), **lengths) == pytest.approx(0.5)
    assert cosine_length_reward(Sample(WRONG, "4", 0, False, False, 100), **lengths) == pytest.approx(-1.0)
    assert cosine_length_reward(Sample(WRONG, "4", 10, False, False, 100), **lengths) == pytest.approx(-0.75)
    assert cosine_length_reward(Sample(WRONG, "4", 40, False, False, 100), **lengths) == pytest.approx(-0.5)
    assert cosine_length_reward(Sample(RIGHT, "4", 100, True, True, 100), **lengths) == -0.5
    assert cosine_length_reward(Sample("\\boxed{4}", "4", 5, False, False, 100), **lengths) == -1.0
    # lengths scale with the budget: the same share of a 32K budget is worth the same
    assert cosine_length_reward(Sample(RIGHT, "4", 24000, False, True, 32000), **lengths) == pytest.approx(0.75)
    assert overlong_reward(Sample("", "", 28800, False, False, 32000), cache_fraction=0.2) == pytest.approx(-0.5)


def test_format_overlong_and_repetition_by_hand():
    assert format_reward(Sample(RIGHT, "4", 5, False, True, 100)) == 1.0
    assert format_reward(Sample("<think>\nx\n</think><think>y</think>\\boxed{4}", "4", 5, False, False, 100)) == 0.0
    assert format_reward(Sample("<think>\nx\n\\boxed{4}", "4", 5, False, False, 100)) == 0.0
    assert overlong_reward(Sample("", "", 70, False, False, 100), cache_fraction=0.2) == 0.0
    assert overlong_reward(Sample("", "", 90, False, False, 100), cache_fraction=0.2) == pytest.approx(-0.5)
    assert overlong_reward(Sample("", "", 101, False, False, 100), cache_fraction=0.2) == -1.0
    # 30 words "a b c a b c ...": 26 five-grams, 3 distinct, each seen 8 or 9 times (> 5)
    looping = Sample(" ".join(["a", "b", "c"] * 10), "", 30, False, False, 100)
    assert repetition_reward(looping) == pytest.approx(-max(26 / 26, 9 / (30 / 5)))
    assert repetition_reward(Sample("one two three four five six seven", "", 7, False, False, 100)) == pytest.approx(
        -1 / (7 / 5)
    )


def test_reward_model_weights_and_errors():
    model = RewardModel({"math_accuracy": {"weight": 0.5}, "format": {"weight": 0.25}})
    total, parts = model(Sample(RIGHT, "4", 5, False, True, 100))
    assert total == 0.75 and parts == {"math_accuracy": 1.0, "format": 1.0}
    batch = model.score([RIGHT, WRONG, "\\boxed{4}"], ["4", "4", "4"], [5, 5, 5], [False, False, False], 100)
    assert [total for total, _ in batch] == [0.75, 0.25, 0.0]
    assert [parts["accuracy"] for _, parts in batch] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward"):
        RewardModel({"helpfulness": {}})
    with pytest.raises(ValueError, match="cosine_length"):
        RewardModel({"cosine_length": {"weight": 1.0}})


def test_schedules_are_piecewise_constant():
    lengthening = {0: 8192, 500: 16384, 1000: 24576}
    assert [scheduled(lengthening, s) for s in (0, 499, 500, 1500)] == [8192, 8192, 16384, 24576]
    assert scheduled(0.6, 123) == 0.6
    with pytest.raises(ConfigError, match=r"stage.temperature: a schedule must start at step 0"):
        check_schedule({5: 1.0}, "stage.temperature", float)


def test_grpo_runs_and_logs_what_matters(tmp_path):
    result = run_stage(
        compose_config(
            *GRPO_FAST,
            "trainer.max_steps=4",
            "stage.num_iterations=2",
            "stage.beta=0.05",
            "stage.aggregation=sequence_mean",
            output_dir=tmp_path,
        )
    )
    assert (result.export_dir / "model.safetensors").exists()
    for name in (
        "train/reward/mean",
        "train/reward/std",
        "train/reward/math_accuracy",
        "train/completion/mean_length",
        "train/completion/max_length",
        "train/completion/truncation_rate",
        "train/groups/zero_variance_fraction",
        "train/groups/dropped_fraction",
        "train/clip_fraction/low",
        "train/kl",
        "train/entropy",
        "train/reward/accuracy",
        "train/reward/verifier_timeouts",
        "train/generation_s",
        "train/training_s",
    ):
        assert logged(tmp_path, name), name
    # max_steps counts optimizer steps: 4 steps with num_iterations=2 are two rollout batches, logged once each
    assert len(logged(tmp_path, "train/loss")) == 2
    assert set(result.metrics) >= {"heldout/accuracy", "heldout_start/accuracy"}
    # a random tiny model never writes a boxed answer: every group has zero variance and is dropped
    assert logged(tmp_path, "train/groups/dropped_fraction")[0] == 1.0
    assert logged(tmp_path, "train/completion/truncation_rate")[0] > 0.5


@pytest.mark.parametrize(
    "settings",
    [
        # the batch std is reduced over both ranks; the KL's frozen reference is sharded outside the checkpoint; the
        # entropy threshold is taken over both ranks' tokens; each rank saves its own rollouts sampled ahead
        [
            "stage.aggregation=token_mean",
            "stage.advantage_scale=batch",
            "stage.beta=0.04",
            "stage.kl_estimator=k2",
            "stage.top_entropy_quantile=0.2",
            "stage.max_staleness=1",
            "stage.rollout_correction=token_truncate",
        ],
        [
            "stage.surrogate=gspo",
            "stage.aggregation=constant",
            "stage.advantage_scale=none",
            "stage.num_iterations=2",
            "stage.delta=2.0",
        ],
    ],
)
def test_grpo_with_fsdp(tmp_path, settings):
    result = run_cli(
        *GRPO_FAST,
        "trainer.max_steps=2",
        *settings,
        "hardware=cpu_fsdp",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "model.safetensors").exists()
    losses = logged(tmp_path, "train/loss")
    assert losses and not any(math.isnan(loss) for loss in losses.values())
    if "stage.max_staleness=1" in settings:
        assert list(logged(tmp_path, "train/staleness/mean").values()) == [0, 1]
        assert sorted(path.name for path in (tmp_path / "rollouts_ahead").iterdir()) == [
            "step2_rank0.pt",
            "step2_rank1.pt",
        ]


def test_the_top_entropy_tokens_do_not_depend_on_the_micro_batches(tmp_path):
    """The threshold is the step's, over all its micro-batches: splitting a step differently trains the same
    tokens, so the loss is the same."""
    losses = {}
    for micro_batch_size in (1, 4):
        run_dir = tmp_path / str(micro_batch_size)
        run_stage(
            compose_config(
                *GRPO_FAST,
                "trainer.max_steps=1",
                "stage.top_entropy_quantile=0.2",
                "heldout.num_prompts=0",
                f"data.micro_batch_size={micro_batch_size}",
                output_dir=run_dir,
            )
        )
        losses[micro_batch_size] = logged(run_dir, "train/loss")[0]
        assert logged(run_dir, "train/entropy_mask/fraction")[0] == pytest.approx(0.2, abs=0.02)
    assert losses[1] == pytest.approx(losses[4], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_trainer_scores_rollouts_under_the_sampling_distribution(tmp_path, temperature):
    """The trainer's log-probs are the sampler's (logits / T): ratio exactly 1 on the first iteration."""
    run_stage(
        compose_config(
            *GRPO_FAST,
            "trainer.max_steps=2",
            "stage.num_iterations=2",
            "stage.dynamic_sampling=false",
            f"stage.sampling.temperature={temperature}",
            output_dir=tmp_path,
        )
    )
    diff = logged(tmp_path, "train/rollout_logprob_diff")
    assert diff and max(diff.values()) < 1e-4, diff
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in logged(tmp_path, "train/ratio/mean").values())
    assert all(value == 0.0 for value in logged(tmp_path, "train/clip_fraction/high").values())
    # the second iteration's metrics are kept beside the first's, not written over them
    assert logged(tmp_path, "train/iteration_1/loss") and logged(tmp_path, "train/iteration_1/ratio/mean")


def test_a_temperature_schedule_scores_each_step_at_its_own_temperature(tmp_path):
    run_stage(
        compose_config(
            *GRPO_FAST,
            "trainer.max_steps=2",
            "stage.dynamic_sampling=false",
            "stage.sampling.temperature={0: 1.0, 1: 0.5}",
            output_dir=tmp_path,
        )
    )
    diff = logged(tmp_path, "train/rollout_logprob_diff")
    assert len(diff) == 2 and max(diff.values()) < 1e-4, diff


def test_heldout_start_is_measured_once_and_survives_a_resume(tmp_path, monkeypatch):
    from thinkforge.stages.base import Stage

    starts = []
    evaluate = Stage.evaluate_heldout

    def counting(self, filename="heldout.json", **options):
        metrics = evaluate(self, filename, **options)
        if filename == "heldout_start.json":
            starts.append(metrics)
        return metrics

    monkeypatch.setattr(Stage, "evaluate_heldout", counting)
    first = run_stage(compose_config(*GRPO_FAST, "trainer.max_steps=2", "trainer.ckpt_every=1", output_dir=tmp_path))
    resumed = run_stage(compose_config(*GRPO_FAST, "trainer.max_steps=3", "trainer.ckpt_every=1", output_dir=tmp_path))
    assert len(starts) == 1
    # logged where the tools look: at step 0 before training, at the held-out point of step 1 (a 2-step run scores
    # every step) and at the last step after it (the resumed run's step 3; resuming from step 2 rewrites the log
    # from there)
    assert set(logged(tmp_path, "heldout_start/accuracy")) == {0}
    assert set(logged(tmp_path, "heldout/accuracy")) == {1, 3}
    start = {k: v for k, v in first.metrics.items() if k.startswith("heldout_start/")}
    assert start and start == {k: v for k, v in resumed.metrics.items() if k.startswith("heldout_start/")}


def test_a_step_whose_rollouts_are_all_truncated_trains_on_nothing_without_crashing(tmp_path, monkeypatch):
    """Every rollout reported truncated: mask_truncated leaves no trainable token in any step."""
    import dataclasses

    from thinkforge.stages.grpo import GRPO

    generate = GRPO.generate
    monkeypatch.setattr(
        GRPO,
        "generate",
        lambda self, *args, **kwargs: [
            [dataclasses.replace(rollout, finished=False) for rollout in group]
            for group in generate(self, *args, **kwargs)
        ],
    )
    run_stage(
        compose_config(
            *GRPO_FAST,
            "trainer.max_steps=2",
            "stage.mask_truncated=true",
            "stage.dynamic_sampling=false",
            "stage.aggregation=token_mean",
            output_dir=tmp_path,
        )
    )
    assert logged(tmp_path, "train/completion/truncation_rate") == {0: 1.0, 1: 1.0}
    assert logged(tmp_path, "train/loss") == {0: 0.0, 1: 0.0}


def test_prompts_longer_than_max_prompt_length_are_dropped(tmp_path):
    from thinkforge.chat import ChatFormat
    from thinkforge.config import validate
    from thinkforge.stages.grpo import GRPO

    run = validate(compose_config(*GRPO_FAST, "stage.max_prompt_length=40", output_dir=tmp_path))
    items = GRPO(run, ChatFormat.for_model(run.model)).build_items("train")
    assert items and all(len(item.token_ids) <= 40 for item in items)
    assert len(items) < run.data.synthetic.num_train


def test_heldout_length_follows_the_stages_completion_length_unless_set(tmp_path):
    from thinkforge.config import validate
    from thinkforge.training import build_stage

    lengthening = "stage.sampling.max_new_tokens={0: 8192, 10: 16384}"
    stage = build_stage(
        validate(
            compose_config(
                *GRPO_FAST,
                "heldout.sampling.max_new_tokens=null",
                lengthening,
                "trainer.max_steps=20",
                output_dir=tmp_path,
            )
        )
    )
    assert stage.heldout.sampling(stage.completion_length()).max_new_tokens == 16384, "the length of the last steps"
    fixed = build_stage(validate(compose_config(*GRPO_FAST, output_dir=tmp_path)))
    assert fixed.heldout.sampling(fixed.completion_length()).max_new_tokens == 24
    sft = build_stage(
        validate(compose_config(*FAST, "stage=sft", "heldout.sampling.max_new_tokens=null", output_dir=tmp_path))
    )
    assert sft.heldout.sampling(sft.completion_length()).max_new_tokens == 256, "data.max_sequence_length"


def test_a_run_that_learns_nothing_says_why_and_stops(tmp_path):
    """A random model never writes a gradable answer: every group has zero spread. The first step warns with the
    cause, and the run stops after stage.max_steps_without_signal such steps with one line naming the knob."""
    result = run_cli(
        *GRPO_FAST,
        "trainer.max_steps=8",
        "stage.sampling.max_new_tokens=8",
        "stage.dynamic_sampling=false",
        "stage.max_steps_without_signal=3",
        "heldout.num_prompts=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "step 0: no group has a reward spread, so this step trains on nothing: every completion was wrong" in output
    assert "100% of completions had no answer the grader could read" in output
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "3 steps in a row trained on nothing (stage.max_steps_without_signal=3)" in error
    assert "cut off at stage.sampling.max_new_tokens=8 tokens" in error  # a random model rarely ends a reply
    assert sorted(logged(tmp_path / "run", "train/loss")) == [0, 1]  # the steps before the stop were logged


@pytest.mark.parametrize(
    "accuracy, answered, truncated, what, knob",
    [
        (0.0, 0.0, 0.1, "every completion was wrong", "stage.answer_extraction=lenient"),
        (0.0, 0.9, 0.8, "every completion was wrong", "stage.sampling.max_new_tokens=96"),
        (0.0, 0.9, 0.1, "every completion was wrong", "pass-rate"),
        (1.0, 1.0, 0.0, "every completion was right", "too easy"),
        (0.5, 1.0, 0.0, "every group's completions scored alike", "pass-rate"),
    ],
)
def test_no_signal_names_the_likely_cause(accuracy, answered, truncated, what, knob):
    from thinkforge.rollout.groups import no_signal_cause

    said, cause = no_signal_cause(accuracy, answered, truncated, 96)
    assert said == what and knob in cause


def test_the_lenient_reward_reads_stated_answers_and_logs_what_was_answered():
    model = RewardModel({"math_accuracy": {"weight": 1.0}}, lenient=True)
    texts = ["So 2 + 2 = 4.\nThe answer is: 4", "#### 4", "I think 4 or 5", "The answer is 4 or 5.", RIGHT]
    scored = model.score(texts, ["4"] * len(texts), [5] * len(texts), [False] * len(texts), 100)
    assert [total for total, _ in scored] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [parts["answered"] for _, parts in scored] == [1.0, 1.0, 0.0, 1.0, 1.0]
    strict = RewardModel({"math_accuracy": {"weight": 1.0}}).score(
        texts, ["4"] * len(texts), [5] * len(texts), [False] * len(texts), 100
    )
    assert [total for total, _ in strict] == [0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("extraction, expected", [("strict", [0.0, 0.0, 1.0]), ("lenient", [1.0, 0.0, 1.0])])
def test_heldout_scores_read_answers_as_the_reward_does(tmp_path, extraction, expected):
    """An instruct model that states its answer and learns to state it right must not score 0% held out."""
    from thinkforge.config import validate
    from thinkforge.training import build_stage

    stage = build_stage(
        validate(compose_config(*GRPO_FAST, f"stage.answer_extraction={extraction}", output_dir=tmp_path))
    )
    texts = ["2 + 2 = 4.\nThe answer is: 4", "The answer is 4 or 5.", RIGHT]
    assert stage.heldout.verify(texts, ["4"] * 3) == expected


def test_heldout_without_a_val_file_holds_out_training_rows(tmp_path):
    """data.val=null with heldout.num_prompts=8: the last 8 training rows are scored before and after, and never
    trained on (the README's own GRPO example has no val file)."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(f'{{"prompt": "What is {i} + 1?", "answer": "{i + 1}"}}\n' for i in range(24)))
    run_dir = tmp_path / "run"
    result = run_cli(
        *GRPO_FAST,
        "data=jsonl",
        f"data.train={rows}",
        "data.val=null",
        "heldout.num_prompts=8",
        "trainer.max_steps=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"held-out prompts: the last 8 rows of {rows} (data.val is null), not trained on"
        in result.stdout + result.stderr
    )
    heldout = __import__("json").loads((run_dir / "heldout.json").read_text())
    assert heldout["samples"] == 8
    assert logged(run_dir, "heldout_start/accuracy")
    too_many = run_cli(
        *GRPO_FAST,
        "data=jsonl",
        f"data.train={rows}",
        "data.val=null",
        "heldout.num_prompts=24",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'all'}",
        cwd=tmp_path,
    )
    assert too_many.returncode == 2 and "heldout.num_prompts=24 would hold out all 24 rows" in too_many.stderr


STALE = [
    *GRPO_FAST,
    "reward@stage.reward=phi4_plus",  # rewards that differ on a random model's text: the losses are not all 0
    "stage.dynamic_sampling=false",
    "heldout.num_prompts=0",
    "stage.max_staleness=2",
    "stage.rollout_correction=token_truncate",
    "trainer.max_steps=6",
    "logger=csv",
]


def test_stale_rollouts_log_their_age_and_a_killed_run_resumes_to_the_same_losses(tmp_path):
    """max_staleness=2: step t trains on rollouts sampled by the weights of step max(0, t - 2). They are saved with
    each checkpoint; a run killed after step 3 resumes from step 2's checkpoint onto the very losses of a run that
    was never killed."""
    full = run_cli(*STALE, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    assert list(logged(tmp_path / "full", "train/staleness/mean").values()) == [0, 1, 2, 2, 2, 2]
    assert list(logged(tmp_path / "full", "train/staleness/share_2").values()) == [0, 0, 1, 1, 1, 1]
    assert logged(tmp_path / "full", "train/rollout_correction/mean")
    losses = logged(tmp_path / "full", "train/loss")
    assert any(abs(loss) > 1e-6 for loss in losses.values()), "a run that trains on nothing would show nothing"

    killed = run_cli(
        *STALE, f"hydra.run.dir={tmp_path / 'killed'}", "+callbacks.kill._target_=faults.KillAtStep",
        "+callbacks.kill.step=3", cwd=tmp_path,
    )  # fmt: skip
    assert killed.returncode == -9, "the fault callback should have SIGKILLed the run"
    assert sorted(path.name for path in (tmp_path / "killed" / "rollouts_ahead").iterdir()) == ["step2_rank0.pt"]
    resumed = run_cli(*STALE, f"hydra.run.dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sampled ahead read back" in resumed.stderr + resumed.stdout
    got = logged(tmp_path / "killed", "train/loss")
    assert sorted(got) == sorted(losses)
    for step, loss in losses.items():
        assert abs(got[step] - loss) < 1e-6, (step, got[step], loss)


def test_stale_rollouts_need_a_correction_for_the_policy_that_sampled_them():
    from thinkforge.config import validate

    with pytest.raises(ConfigError, match=r"stage.rollout_correction.*max_staleness=1 trains on rollouts"):
        validate(compose_config(*GRPO_FAST, "stage.max_staleness=1"))
