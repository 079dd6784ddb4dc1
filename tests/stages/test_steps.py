"""A non-finite loss or gradient norm stops the run with one line naming the step; saved checkpoints stay finite."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_config, run_cli
from faults import PoisonWeightsAfterStep

from thinkforge.stages.steps import NonFiniteStep
from thinkforge.training import run_stage


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose_config(
        *FAST, "trainer.max_steps=6", "trainer.val_every=100", "heldout.num_prompts=0", output_dir=tmp_path
    )
    with pytest.raises(NonFiniteStep) as stopped:
        run_stage(cfg, callbacks=[PoisonWeightsAfterStep(3)])
    message = str(stopped.value)
    assert message.startswith("step 3: the loss is nan") and "\n" not in message
    assert str(tmp_path / "checkpoints") in message
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values())
    assert not (tmp_path / "export").exists()


def test_the_command_line_reports_it_in_one_line(tmp_path):
    result = run_cli(
        *FAST,
        "trainer.max_steps=6",
        "heldout.num_prompts=0",
        f"output_dir={tmp_path}",
        "+callbacks={poison: {_target_: faults.PoisonWeightsAfterStep, step: 3}}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: step 3: the loss is nan"), result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
