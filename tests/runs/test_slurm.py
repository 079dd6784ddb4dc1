"""What `-m hydra/launcher=slurm hardware=multinode` submits, with a fake `sbatch` on PATH (no cluster needed)."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

FAKE_SBATCH = """#!/bin/sh
# Keep the batch script for the test, answer like sbatch does.
cp "$(eval echo \\${$#})" "$SBATCH_CAPTURE"
echo "Submitted batch job 4242"
"""


def test_slurm_launcher_submits_the_multinode_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):  # submitit looks for srun first
        program = bin_dir / name
        program.write_text(text)
        program.chmod(program.stat().st_mode | stat.S_IEXEC)
    capture = tmp_path / "submitted.sh"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_CAPTURE": str(capture)}
    # the README's command as written, with the default sweep dir
    command = [
        str(Path(sys.executable).with_name("thinkforge-train")),
        "-m",
        "hydra/launcher=slurm",
        "hardware=multinode",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=8",
        "hydra.launcher.partition=gpu",
        "stage=grpo",
        "model=r1_distill_qwen_1_5b",
        "optim.lr=1e-6,2e-6",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not capture.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.kill()
    output = process.communicate()[0]
    assert capture.exists(), output[-3000:]

    script = capture.read_text()
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--requeue",
        "--signal=USR2@120",
        "--array=0-1%2",
    ):
        assert f"#SBATCH {directive}" in script, (directive, script)
    assert "srun" in script and "submitit.core._submit" in script

    jobs = []
    for submission in sorted(tmp_path.glob("logs/multiruns/*/.submitit/*/*_submitted.pkl")):
        with submission.open("rb") as handle:
            jobs.append(pickle.load(handle))
    assert [job.function.task_function.__name__ for job in jobs] == ["_train", "_train"]
    assert sorted(next(o for o in job.args[0] if o.startswith("optim.lr=")) for job in jobs) == [
        "optim.lr=1e-06",
        "optim.lr=2e-06",
    ]
    assert all({"hardware=multinode", "stage=grpo"} <= set(job.args[0]) for job in jobs)
    launcher = jobs[0].function.config.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node) == (2, 8), "the job's hardware=multinode resolves to these"


def test_multinode_hardware_takes_its_size_from_the_launcher(tmp_path):
    from conftest import run_cli

    result = run_cli(
        "hydra/launcher=slurm",
        "hardware=multinode",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        "data.batch_size=64",
        "data.micro_batch_size=2",
        "dry_run=true",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices: 4\n  num_nodes: 2\n  strategy: fsdp" in result.stdout


def test_requeued_run_resumes_from_its_newest_checkpoint(tmp_path):
    from conftest import compose_config
    from omegaconf import OmegaConf

    from thinkforge.config import validate
    from thinkforge.resume import resume_checkpoint

    run = validate(compose_config(output_dir=tmp_path))
    assert run.ckpt_path == "last" and resume_checkpoint(run) is None, "a fresh directory starts from scratch"
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_text("older")
    hpc.write_text("newer: saved when SLURM signalled the job")
    os.utime(last, (1, 1))
    assert resume_checkpoint(run) == str(hpc)
    os.utime(hpc, (0, 0))
    assert resume_checkpoint(run) == str(last)
    explicit = validate(OmegaConf.merge(compose_config(output_dir=tmp_path), {"ckpt_path": "/elsewhere.ckpt"}))
    assert resume_checkpoint(explicit) == "/elsewhere.ckpt"
