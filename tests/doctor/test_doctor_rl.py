"""thinkforge-doctor on the RL stages: every check's status on GRPO and on DPO (file and rollout pairs) with a
model that has something to learn, the vacuous warning when nothing is learned, and no checkpoint left behind."""

from __future__ import annotations

import pytest
from conftest import FAST, compose_config

from thinkforge import doctor
from thinkforge.data import synthetic

COIN_RUN = [
    *FAST,
    "data=jsonl",
    "model=pretrained",
    "data.val=null",
    "heldout.num_prompts=0",
    "data.batch_size=4",
    "data.micro_batch_size=2",
]


def statuses(findings):
    return {finding.check: finding.status for finding in findings}


def no_checkpoints_left(workdir):
    left = [path for pattern in ("**/checkpoints", "**/export", "**/*.ckpt") for path in workdir.glob(pattern)]
    assert left == [], left


def test_doctor_on_grpo(tmp_path, coin):
    export, prompts = coin
    cfg = compose_config(
        *COIN_RUN,
        "experiment=demo_grpo",
        f"model.name_or_path={export}",
        f"data.train={prompts}",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=12",
        output_dir=tmp_path,
    )
    findings = doctor.run_doctor(cfg)
    assert statuses(findings) == {
        "template and mask": "pass",
        "split: micro-batches": "pass",
        "split: packed vs unpacked": "skip",
        "split: ranks": "skip",
        "sampler vs trainer log-probs": "pass",
        "grader audit": "pass",
        "tool turns: token stream": "skip",
        "resume equivalence": "pass",
        "budget": "pass",
    }, doctor.format_findings(findings)
    sampler = next(f for f in findings if f.check == "sampler vs trainer log-probs")
    assert "hf engine: mean |Δ log p|" in sampler.measured
    budget = next(f for f in findings if f.check == "budget")
    assert "GiB of disk" in budget.measured
    no_checkpoints_left(tmp_path)


@pytest.mark.parametrize("pairs", ["file", "rollout"])
def test_doctor_on_dpo(tmp_path, coin, pairs):
    export, prompts = coin
    if pairs == "file":
        data = tmp_path / "pairs.jsonl"
        data.write_text(
            "".join(__import__("json").dumps(row) + "\n" for row in synthetic.wrong_answer_pairs(16, seed=5))
        )
        extra = ["stage.pairs=file", f"data.train={data}"]
    else:
        extra = [
            "stage.pairs=rollout",
            f"data.train={prompts}",
            "stage.sampling.num_samples=4",
            "stage.sampling.max_new_tokens=12",
        ]
    cfg = compose_config(*COIN_RUN, "experiment=demo_dpo", f"model.name_or_path={export}", *extra, output_dir=tmp_path)
    findings = doctor.run_doctor(cfg)
    expected = {
        "template and mask": "pass",
        "split: micro-batches": "pass",
        "split: packed vs unpacked": "skip",
        "split: ranks": "skip",
        "sampler vs trainer log-probs": "skip" if pairs == "file" else "pass",
        "grader audit": "skip" if pairs == "file" else "pass",
        "tool turns: token stream": "skip",
        "resume equivalence": "pass",
        "budget": "pass",
    }
    assert statuses(findings) == expected, doctor.format_findings(findings)
    no_checkpoints_left(tmp_path)


def test_doctor_flags_a_run_that_learns_nothing_as_vacuous(tmp_path):
    """A random model never writes a gradable answer: every GRPO loss is 0, and "resume equivalence" would pass
    by comparing zeros."""
    cfg = compose_config(
        *FAST,
        "experiment=demo_grpo",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=8",
        "data.batch_size=4",
        "data.micro_batch_size=2",
        "heldout.num_prompts=0",
        output_dir=tmp_path,
    )
    findings = {finding.check: finding for finding in doctor.run_doctor(cfg)}
    for check in ("resume equivalence", "budget"):
        assert findings[check].status == "warn" and findings[check].measured.startswith("vacuous"), findings[check]
    assert findings["sampler vs trainer log-probs"].status == "pass"  # the crash issue 27 found
    no_checkpoints_left(tmp_path)
