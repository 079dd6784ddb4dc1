"""thinkforge-eval: hand-computed pass@k / maj@k, s1 budget forcing, stop strings, benchmark configs."""

from __future__ import annotations

import json

import pytest
from conftest import BENCHMARKS, run_cli

from thinkforge.benchmarks import BudgetForcingConfig
from thinkforge.data import synthetic_code
from thinkforge.eval import generate_with_budget
from thinkforge.metrics import pass_at_k
from thinkforge.rollout.base import Rollout, rollout_of
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def answer(value: str | None) -> str:
    return (
        "<think>working</think> I am not sure." if value is None else f"<think>working</think> So \\boxed{{{value}}}."
    )


# problem -> (gold, the four sampled answers); by hand, with ties going to the earliest answer:
#   p0: correct 0111 -> pass@1 .75, pass@2 1,   maj@1 0 (7), maj@2 0 (7 vs 10 tie -> 7), maj@4 1 (10 x3)
#   p1: correct 0100 -> pass@1 .25, pass@2 1/2, maj@1 0, maj@2 0 (5 vs 3 tie -> 5), maj@4 0 (5 x2; no answer abstains)
#   p2: correct 1100 -> pass@1 .5,  pass@2 5/6, maj@1 1, maj@2 1,
#       maj@4 1 (\frac{1}{2} = \dfrac{1}{2} x2 vs 1/3 x2 -> earliest)
SAMPLES = {
    "p0": ("10", ["7", "10", "10", "10"]),
    "p1": ("3", ["5", "3", "5", None]),
    "p2": ("\\frac{1}{2}", ["\\frac{1}{2}", "\\dfrac{1}{2}", "1/3", "1/3"]),
}
EXPECTED = {
    "problems": 3,
    "samples": 12,
    "pass@1": (0.75 + 0.25 + 0.5) / 3,
    "pass@2": (1 + 0.5 + 5 / 6) / 3,
    "pass@4": 1.0,
    "maj@1": 1 / 3,
    "maj@2": 1 / 3,
    "maj@4": 2 / 3,
}


def test_eval_reproduces_hand_computed_pass_and_majority(tmp_path):
    rows = [
        {"problem": p, "gold": gold, "completion": answer(a)} for p, (gold, answers) in SAMPLES.items() for a in answers
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli(
        f"samples_file={samples}",
        "ks=[1,2,4]",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
        program="thinkforge-eval",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: summary[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    graded = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in graded[:4]] == [False, True, True, True]
    assert "| pass@1 |" in result.stdout.replace("| problems | samples ", "| ")


def test_pass_at_k_on_the_coding_task_runs_each_samples_code_against_its_tests(tmp_path):
    """Sampled through the engine (a random model: every sample fails), then re-graded with known solutions: a
    whole function passes, one that forgets its step does not, and pass@k counts them."""
    sampled = run_cli(
        "benchmark=code", "model=tiny", "benchmark.limit=2", "sampling.num_samples=4", "ks=[1,2,4]",
        "sampling.max_new_tokens=8",
        f"hydra.run.dir={tmp_path / 'sampled'}", cwd=tmp_path, program="thinkforge-eval",
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    problems = {"whole": synthetic_code.generate("test", 2, max_level=2, max_number=9)}
    problems["forgetful"] = synthetic_code.generate("test", 2, max_level=2, max_number=9, buggy_fraction=1.0)
    assert [row["gold"] for row in rows[::4]] == [list(problem.tests) for problem in problems["whole"]]
    solutions = [["whole", "forgetful", "forgetful", "forgetful"], ["whole", "whole", "forgetful", "whole"]]
    for row in rows:
        row["completion"] = problems[solutions[row["problem"]][row["sample"]]][row["problem"]].completion
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    regraded = run_cli(
        f"samples_file={samples}", "ks=[1,2,4]", f"hydra.run.dir={tmp_path / 'regraded'}", cwd=tmp_path,
        program="thinkforge-eval",
    )  # fmt: skip
    assert regraded.returncode == 0, regraded.stderr[-3000:]
    summary = json.loads((tmp_path / "regraded" / "summary.json").read_text())
    expected = {"pass@1": (0.25 + 0.75) / 2, "pass@2": (0.5 + 1.0) / 2, "pass@4": 1.0}
    assert {k: summary[k] for k in expected} == pytest.approx(expected)


def test_samples_file_errors_name_the_row(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"problem": 1, "gold": "2", "completion": "x"})
        + "\n"
        + json.dumps({"problem": 1, "gold": "2"})
        + "\n"
    )
    result = run_cli(
        f"samples_file={samples}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, program="thinkforge-eval"
    )
    assert result.returncode != 0 and "samples.jsonl: row 2: field 'completion' is missing" in result.stderr


class ThinkingEngine:
    """Thinks in 3-token steps and closes its thinking after `steps` of them; answers '42' and stops."""

    def __init__(self, steps: int) -> None:
        self.steps, self.calls = steps, []

    def generate(self, prompts, sampling, *, seed):
        self.calls.append(sampling)
        out = []
        for index, _ in enumerate(prompts):
            if "</think>" in sampling.stop_strings:
                thinking = " step" * min(self.steps, sampling.max_new_tokens // 3)
                closes = self.steps * 3 <= sampling.max_new_tokens
                text = thinking + ("</think>" if closes else "")
                tokens = tuple(range(len(thinking.split()) * 3 + closes))
                out.append([Rollout(index, text, tokens, False, "</think>" if closes else None)])
            else:
                out.append([Rollout(index, " \\boxed{42}", (1, 2), True)])
        return out


def test_budget_forcing_extends_with_wait_then_answers():
    engine = ThinkingEngine(steps=2)
    budget = BudgetForcingConfig(max_thinking_tokens=100, num_waits=2)
    [completion] = generate_with_budget(engine, ["Q"], SamplingParams(max_new_tokens=100), budget, seed=0)
    assert completion.text == " step stepWait step stepWait step step</think> \\boxed{42}"
    assert completion.waits == 2 and completion.finished and completion.num_tokens == 3 * 7 + 2


def test_budget_forcing_caps_thinking():
    engine = ThinkingEngine(steps=50)
    budget = BudgetForcingConfig(max_thinking_tokens=9, num_waits=3)
    [completion] = generate_with_budget(engine, ["Q"], SamplingParams(max_new_tokens=100), budget, seed=0)
    assert completion.text == " step step step\n</think>\n \\boxed{42}", "thinking is closed by force at the cap"
    assert engine.calls[0].max_new_tokens == 9 and completion.waits == 0


def test_engine_cuts_a_row_after_its_stop_string(chat, tokenizer):
    engine = HFEngine(None, chat)
    row = (
        tokenizer.encode("<think>\n3 + 4 = 7\n</think>\nThe answer", add_special_tokens=False)
        + [tokenizer.pad_token_id] * 3
    )
    rollout = rollout_of(tokenizer, 0, row, [], engine.end_ids, ("</think>",))
    assert rollout.text == "<think>\n3 + 4 = 7\n</think>" and rollout.stopped_by == "</think>" and not rollout.finished
    plain = rollout_of(
        tokenizer, 0, [*tokenizer.encode("7", add_special_tokens=False), tokenizer.eos_token_id], [], engine.end_ids, ()
    )
    assert plain.text == "7" and plain.finished and plain.stopped_by is None


@pytest.mark.parametrize("name", ["synthetic", "demo", "code", "math500", "aime24", "amc23", "gsm8k"])
def test_benchmark_configs_compose(name, tmp_path):
    for file in ("aime24", "amc23", "gsm8k_test", "math500"):  # the dry run checks that they exist
        (tmp_path / f"{file}.jsonl").touch()
    result = run_cli(
        f"benchmark={name}",
        "model=pretrained",
        f"model.name_or_path={tmp_path}",
        f"benchmarks_dir={tmp_path}",
        "dry_run=true",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        program="thinkforge-eval",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"name: {name}" in result.stdout


def test_a_missing_benchmark_file_is_one_line_naming_where_benchmarks_are_read_from(tmp_path):
    result = run_cli(
        "benchmark=math500",
        "model=pretrained",
        f"model.name_or_path={tmp_path}",
        f"benchmarks_dir={tmp_path}/none",
        cwd=tmp_path,
        program="thinkforge-eval",
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert (
        result.stderr.startswith(f"error: benchmark.path: {tmp_path}/none/math500.jsonl: no such file")
        and "THINKFORGE_BENCHMARKS" in result.stderr
    )


@pytest.mark.skipif(not BENCHMARKS.exists(), reason="shared benchmarks not present")
def test_gsm8k_gold_answers_are_the_numbers_after_the_marker(monkeypatch):
    from hydra import compose, initialize_config_dir

    from thinkforge.cli import config_dir
    from thinkforge.config import validate
    from thinkforge.eval import load_benchmark

    monkeypatch.setenv("THINKFORGE_BENCHMARKS", str(BENCHMARKS))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "eval", overrides=["benchmark=gsm8k", "benchmark.limit=3", "samples_file=unused", "output_dir=unused"]
        )
    problems, golds = load_benchmark(validate(cfg))
    assert len(problems) == 3 and golds[0] == "18" and all(g.replace(",", "").isdigit() for g in golds)


def test_demo_benchmark_is_the_demo_pipelines_held_out_set():
    from hydra import compose, initialize_config_dir

    from thinkforge.cli import config_dir
    from thinkforge.config import DataConfig, validate
    from thinkforge.data.records import load_records
    from thinkforge.eval import load_benchmark

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        eval_cfg = compose("eval", overrides=["benchmark=demo", "samples_file=unused", "output_dir=unused"])
        train_cfg = compose("train", overrides=["data=demo", "output_dir=unused"])
    problems, golds = load_benchmark(validate(eval_cfg))
    data: DataConfig = validate(train_cfg).data
    heldout = load_records(data.val, data.val_split, data, required=("prompt", "answer")).rows
    assert problems == [row["prompt"] for row in heldout] and golds == [row["answer"] for row in heldout]


def test_regrading_writes_under_the_samples_benchmark_and_rejects_a_k_beyond_the_samples(tmp_path):
    rows = [
        {"benchmark": "gsm8k", "problem": p, "gold": "1", "completion": answer(a)} for p in range(2) for a in ("1", "2")
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli(f"samples_file={samples}", "ks=[1,2]", cwd=tmp_path, program="thinkforge-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    [summary] = (tmp_path / "logs" / "eval" / "gsm8k" / "runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["benchmark"] == "gsm8k"
    too_many = run_cli(f"samples_file={samples}", "ks=[1,4]", cwd=tmp_path, program="thinkforge-eval")
    assert too_many.returncode != 0 and "some problem has only 2" in too_many.stderr


def test_lenient_grading_is_chosen_by_config_and_strict_stays_the_default(tmp_path):
    rows = [
        {"problem": 0, "gold": "34", "completion": "Final Answer: The largest $n$ is 34."},
        {"problem": 0, "gold": "34", "completion": "<think>\n</think>\n\\boxed{34}"},
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for grading, expected in (("strict", [False, True]), ("lenient", [True, True])):
        out = tmp_path / grading
        result = run_cli(
            f"samples_file={samples}",
            "ks=[1]",
            f"grading={grading}",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
            program="thinkforge-eval",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert [json.loads(line)["correct"] for line in (out / "samples.jsonl").read_text().splitlines()] == expected
    wrong = run_cli(f"samples_file={samples}", "grading=loose", cwd=tmp_path, program="thinkforge-eval")
    assert wrong.returncode != 0 and "grading" in wrong.stderr
