"""A run directory's record is never rewritten by another command (issue 36): a refused command leaves nothing on
disk, a command of another config is refused in one line, and continuing the same run (more steps) is allowed."""

from __future__ import annotations

from conftest import FAST, run_cli

from thinkforge.run_record import differing_keys

SHORT = [*FAST, "data.synthetic.num_train=64", "trainer.max_steps=2", "heldout.num_prompts=0"]


def test_another_command_never_rewrites_a_finished_runs_record(tmp_path):
    run = tmp_path / "run"
    first = run_cli(*SHORT, f"hydra.run.dir={run}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record = (run / ".hydra" / "config.yaml").read_text()
    hparams = (run / "csv" / "hparams.yaml").read_text()

    failed = run_cli(*SHORT, "data=jsonl", f"data.train={tmp_path}/missing.jsonl", f"hydra.run.dir={run}", cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr[-3000:]
    other = run_cli(*SHORT, "optim.lr=0.5", f"hydra.run.dir={run}", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr[-3000:]
    assert "holds a run of another config (optim.lr differ)" in other.stderr
    assert (run / ".hydra" / "config.yaml").read_text() == record
    assert (run / "csv" / "hparams.yaml").read_text() == hparams

    longer = run_cli(*SHORT, "trainer.max_steps=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "max_steps: 3" in (run / ".hydra" / "config.yaml").read_text(), "the continued run is now the record"


def test_a_refused_command_leaves_no_run_directory(tmp_path):
    for bad in (["trainer.max_step=2"], ["+trainer.max_step=2"], ["data=jsonl", f"data.train={tmp_path}/none.jsonl"]):
        result = run_cli(*bad, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (bad, result.stderr[-2000:])
    assert not (tmp_path / "logs").exists(), sorted(str(p) for p in tmp_path.rglob("*"))


def test_differing_keys_ignore_what_a_continued_run_may_change():
    recorded = {"optim": {"lr": 1e-3}, "trainer": {"max_steps": 2}, "callbacks": None}
    assert differing_keys(recorded, {**recorded, "trainer": {"max_steps": 9}, "callbacks": {"x": {}}}) == []
    assert differing_keys(recorded, {**recorded, "optim": {"lr": 2e-3}, "seed": 1}) == ["optim.lr", "seed"]
