"""Through the console script: FSDP2 parity with one process, kill-and-resume, multirun sweeps."""

from __future__ import annotations

import torch
from conftest import FAST, logged, read_metrics, run_cli
from safetensors.torch import load_file


def test_fsdp_two_processes_match_one_process(tmp_path):
    exports = {}
    for hardware in ("cpu", "cpu_fsdp"):
        run_dir = tmp_path / hardware
        result = run_cli(*FAST, f"hardware={hardware}", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        exports[hardware] = load_file(run_dir / "export" / "model.safetensors")
    assert exports["cpu"].keys() == exports["cpu_fsdp"].keys()
    for name, tensor in exports["cpu"].items():
        torch.testing.assert_close(exports["cpu_fsdp"][name], tensor, atol=1e-4, rtol=0, msg=name)
    # AdamW with a nonzero gradient and learning rate moves every weight it steps: the match is not of untrained models
    for hardware in exports:
        assert all(norm > 0 for norm in logged(tmp_path / hardware, "train/grad_norm").values())
        assert all(lr > 0 for lr in logged(tmp_path / hardware, "train/lr").values())


def test_killed_run_resumes_with_identical_losses(tmp_path):
    common = [*FAST, "trainer.max_steps=6", "logger=csv"]
    full = run_cli(*common, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run_cli(
        *common,
        f"hydra.run.dir={tmp_path / 'killed'}",
        "+callbacks.kill._target_=faults.KillAtStep",
        "+callbacks.kill.step=3",
        cwd=tmp_path,
    )
    assert killed.returncode == -9, "the fault callback should have SIGKILLed the run"
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()

    # re-running into the same directory resumes from its last checkpoint (ckpt_path=last, the default)
    resumed = run_cli(*common, f"hydra.run.dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    expected, got = logged(tmp_path / "full", "train/loss"), logged(tmp_path / "killed", "train/loss")
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "killed") if row.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5], "the CSV log keeps the steps before the kill and holds each step once"
    for step in got:
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])
    lr_full, lr_resumed = logged(tmp_path / "full", "train/lr"), logged(tmp_path / "killed", "train/lr")
    assert all(abs(lr_resumed[s] - lr_full[s]) < 1e-12 for s in lr_resumed)


def test_multirun_sweep_gives_one_run_directory_per_job_named_by_its_overrides_and_a_summary(tmp_path):
    result = run_cli("-m", "optim.lr=1e-3,3e-3", "trainer.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = (tmp_path / "logs" / "multiruns").iterdir()
    jobs = sorted(path.name for path in sweep.iterdir() if path.is_dir())
    assert jobs == ["optim.lr=0.001,trainer.max_steps=5", "optim.lr=0.003,trainer.max_steps=5"]
    for job in jobs:
        assert (sweep / job / "export" / "model.safetensors").exists()
        assert logged(sweep / job, "train/loss")
    summary = (sweep / "sweep_summary.md").read_text()
    assert (
        summary.count("optim.lr=0.001") == 1 and summary.count("optim.lr=0.003") == 1 and "held-out accuracy" in summary
    )
    assert "[sweep]" in result.stdout
