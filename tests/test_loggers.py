"""logger=wandb and logger=mlflow, offline: each writes its run beside the CSV log, and a resumed run continues
that run instead of starting a second one."""

from __future__ import annotations

import json
import os

from conftest import FAST, logged, run_cli

SHORT = [*FAST, "data.synthetic.num_train=64", "heldout.num_prompts=0", "trainer.val_every=1000"]


def test_wandb_offline_writes_the_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    for steps in (2, 3):
        result = run_cli(*SHORT, "logger=wandb", f"trainer.max_steps={steps}", f"hydra.run.dir={run}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    offline = sorted(path.name for path in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({name.rsplit("-", 1)[1] for name in offline}) == 1, offline
    assert sorted(logged(run, "train/loss")) == [0, 1, 2], "the CSV log is still written beside it"


def test_wandb_keeps_each_heldout_points_samples_as_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    heldout = ["heldout.num_prompts=4", "heldout.sampling.max_new_tokens=8", "heldout.every_n_steps=1"]
    result = run_cli(*SHORT, *heldout, "logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = sorted((run / "wandb").glob("offline-run-*/files/media/table/heldout/samples_*.table.json"))
    assert len(tables) == 2, "one per point: after step 1 and at the end"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "gold", "correct", "finished", "tokens"]
    assert len(table["data"]) == 4


def test_mlflow_file_store_holds_params_and_metrics_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what thinkforge sets for its default file store

    run = tmp_path / "run"
    for steps in (2, 3):
        result = run_cli(*SHORT, "logger=mlflow", f"trainer.max_steps={steps}", f"hydra.run.dir={run}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=(tmp_path / "logs" / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "thinkforge"]
    [tracked] = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_id == (run / "mlflow_run_id").read_text()
    assert tracked.data.params["optim/lr"] == "0.003" and tracked.data.params["trainer/max_steps"] == "2"
    steps = sorted(point.step for point in client.get_metric_history(tracked.info.run_id, "train/loss"))
    assert steps[-1] == 2 and set(steps) == {0, 1, 2}
    assert os.path.exists(run / "csv" / "metrics.csv")
