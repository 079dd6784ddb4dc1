"""Rollout DPO under two FSDP processes: every rank samples its share of the prompts with the sharded policy, and
a killed run resumes from the pairs file and its checkpoint (which holds no reference weights) with the very
losses of an uninterrupted run."""

from __future__ import annotations

import json

from conftest import COIN_PROMPTS, FAST, logged, read_metrics, run_cli
from torch.distributed.checkpoint import FileSystemReader

TIMEOUT = 240


def rollout_dpo(coin, run_dir, *extra):
    export, prompts = coin
    return run_cli(
        *FAST,
        "experiment=demo_dpo",
        "data=jsonl",
        "model=pretrained",
        f"model.name_or_path={export}",
        f"data.train={prompts}",
        "data.val=null",
        "heldout.num_prompts=0",
        "stage.rpo_alpha=1.0",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=12",
        "data.batch_size=4",
        "data.micro_batch_size=2",
        "trainer.max_steps=6",
        "model.dtype=bfloat16",
        "hardware=cpu_fsdp",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *extra,
        cwd=run_dir.parent,
        timeout=TIMEOUT,
    )


def read_pairs(run_dir):
    return [json.loads(line) for line in (run_dir / "rollout_pairs_train.jsonl").read_text().splitlines()]


def test_rollout_dpo_samples_on_every_rank_and_resumes_from_its_pairs_file(coin, tmp_path):
    full = rollout_dpo(coin, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    pairs = read_pairs(tmp_path / "full")
    assert {pair["provenance"]["rank"] for pair in pairs} == {0, 1}, "both ranks sampled"
    assert all(pair["provenance"]["prompt_index"] % 2 == pair["provenance"]["rank"] for pair in pairs), (
        "each its own share"
    )
    assert len(pairs) >= COIN_PROMPTS // 2

    killed = rollout_dpo(
        coin, tmp_path / "killed", "+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=3"
    )
    assert killed.returncode == -9, "the fault callback should have SIGKILLed the run"
    pairs_file = tmp_path / "killed" / "rollout_pairs_train.jsonl"
    written, stamp = pairs_file.read_text(), pairs_file.stat().st_mtime_ns

    checkpoint = FileSystemReader(tmp_path / "killed" / "checkpoints" / "last.ckpt").read_metadata().state_dict_metadata
    weights = {key: meta for key, meta in checkpoint.items() if hasattr(meta, "properties")}
    assert any(".policy." in key or key.startswith("policy.") for key in weights), sorted(weights)[:5]
    assert not [key for key in weights if "reference" in key], "the frozen reference is rebuilt, not stored"
    assert {str(meta.properties.dtype) for meta in weights.values()} == {"torch.float32"}, (
        "fp32 shards under bf16 compute"
    )

    resumed = rollout_dpo(coin, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resuming from" in output and "read back from" in output
    assert pairs_file.read_text() == written and pairs_file.stat().st_mtime_ns == stamp, (
        "the pairs were not sampled again"
    )
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "killed") if row.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5], "the CSV log keeps the steps before the kill and holds each step once"
    expected, got = logged(tmp_path / "full", "train/loss"), logged(tmp_path / "killed", "train/loss")
    assert got.keys() == expected.keys()
    for step in got:
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])
