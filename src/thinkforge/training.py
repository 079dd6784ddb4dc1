"""One stage run: validate the config, build tokenizer, stage, data and Trainer, fit, export."""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from thinkforge.backbone import compute_dtype
from thinkforge.chat import ChatFormat
from thinkforge.config import TrainConfig, validate
from thinkforge.curves import stage_curves
from thinkforge.errors import ConfigError
from thinkforge.preemption import Preemption, timed_checkpoint
from thinkforge.preflight import check_train_paths
from thinkforge.progress import duration, on_terminal
from thinkforge.resume import ResumeState, resume_checkpoint
from thinkforge.run_record import record_run, task_overrides
from thinkforge.stage_configs import STAGE_SCHEMAS
from thinkforge.stages.base import Stage
from thinkforge.stages.heldout import HeldOutPoints, describe_points

log = logging.getLogger(__name__)

# Known-benign warnings: our manual loop checkpoints the post-step state on purpose (that is the state to resume
# from), validation metrics are already reduced across ranks by the stage's `Collectives`, and DCP's overwrite notice is
# about the rolling `last.ckpt`.
for pattern in (
    ".*ModelCheckpoint with manual optimization.*",
    ".*when logging on epoch level in distributed setting.*",
    ".*Detected an existing checkpoint.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
):
    warnings.filterwarnings("ignore", message=pattern)


@dataclass
class RunResult:
    output_dir: Path
    export_dir: Path
    metrics: dict[str, float]


def build_stage(run: TrainConfig) -> Stage:
    """The Stage class the stage schema names, on the validated run config (its knobs are `run.stage`)."""
    stage_class = get_class(run.stage._target_)
    if not (isinstance(stage_class, type) and issubclass(stage_class, Stage)):
        raise ConfigError(f"stage._target_: {run.stage._target_} is not a thinkforge Stage")
    return stage_class(run, ChatFormat.for_model(run.model, run.data.system_prompt, tools=run.tools.enabled))


def build_strategy(run: TrainConfig) -> Any:
    hardware = run.hardware
    if hardware.strategy == "single":
        return "auto"
    return ModelParallelStrategy(
        data_parallel_size=hardware.devices * hardware.num_nodes,
        tensor_parallel_size=1,
        save_distributed_checkpoint=True,
        process_group_backend=hardware.process_group_backend,
    )


def lightning_precision(run: TrainConfig) -> Literal["bf16-mixed", "32-true"]:
    """One device: Lightning autocasts to the compute dtype over fp32 weights. FSDP: the weights' shards stay
    fp32 and `parallelize`'s mixed-precision policy casts, so Lightning must not cast a second time."""
    if run.hardware.strategy == "single" and compute_dtype(run.model.dtype) == torch.bfloat16:
        return "bf16-mixed"
    return "32-true"


def _instantiate_group(group: Any) -> list[Any]:
    """A config group of named `_target_` entries (loggers, callbacks) -> objects; null entries are switched off."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


class StepProgressBar(RichProgressBar):
    """Names no epoch: a stage trains a budget of steps over an endless stream (max_epochs is -1, which Lightning's
    own bar prints as "Epoch 0/-2"); and says seconds per step when a step takes longer than a second, where
    Lightning's bar says 0.00it/s."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{type(self.trainer.lightning_module).__name__} steps"

    def configure_columns(self, trainer: L.Trainer) -> list[Any]:
        from rich.progress import ProgressColumn
        from rich.text import Text

        class StepSpeed(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                if not speed and task.completed and task.elapsed:
                    speed = task.completed / task.elapsed
                if not speed:
                    return Text("")
                return Text(
                    f"{speed:.2f} steps/s" if speed >= 1 else f"{1 / speed:.1f} s/step", style="progress.data.speed"
                )

        return [*super().configure_columns(trainer)[:-1], StepSpeed()]


class StepLog(Callback):
    """The step progress where no terminal shows a bar (`nohup`, a SLURM log, a pipeline's stage): a line every
    `every_s` seconds with the step, its loss, seconds per step and the time left."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.started = self.last_report = time.monotonic()
        self.first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last_report = time.monotonic()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last_report < self.every_s or not trainer.is_global_zero:
            return
        self.last_report = now
        done = trainer.global_step - self.first_step
        per_step = (now - self.started) / max(done, 1)
        shown = [(short, trainer.callback_metrics.get(short)) for _, short in pl_module.headline_metrics]
        log.info(
            "step %d/%d%s, %.1f s/step, about %s left",
            trainer.global_step,
            trainer.max_steps,
            "".join(f", {name} {float(value):.4g}" for name, value in shown if value is not None),
            per_step,
            duration(per_step * (trainer.max_steps - trainer.global_step)),
        )


def build_trainer(
    run: TrainConfig, extra_callbacks: Sequence[Callback] = (), *, has_val: bool | None = None
) -> L.Trainer:
    """`has_val`: whether the stage validates (GRPO never does); by default, whether the data has a val split."""
    checkpoints = Path(run.output_dir) / "checkpoints"
    callbacks: list[Callback] = [
        HeldOutPoints(),  # first: a step's held-out point comes before that step's checkpoints
        ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=run.trainer.ckpt_every, save_last=True, save_top_k=1),
        Preemption(checkpoints / "last.ckpt"),
        *timed_checkpoint(checkpoints / "last.ckpt", run.trainer.ckpt_every_minutes),
        ResumeState(),
        StepProgressBar() if on_terminal() else StepLog(),
        *_instantiate_group(run.callbacks),
        *extra_callbacks,
    ]
    has_val = run.data.val is not None if has_val is None else has_val
    if has_val and run.trainer.val_every > run.trainer.max_steps:
        log.warning(
            "validation never runs: trainer.val_every=%d > trainer.max_steps=%d",
            run.trainer.val_every,
            run.trainer.max_steps,
        )
    return L.Trainer(
        accelerator=run.hardware.accelerator,
        devices=run.hardware.devices,
        num_nodes=run.hardware.num_nodes,
        strategy=build_strategy(run),
        precision=lightning_precision(run),
        max_steps=run.trainer.max_steps,
        val_check_interval=run.trainer.val_every if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=run.trainer.num_sanity_val_steps,
        log_every_n_steps=run.trainer.log_every,
        logger=_instantiate_group(run.logger) or False,
        callbacks=callbacks,
        default_root_dir=run.output_dir,
        enable_model_summary=False,
        enable_progress_bar=on_terminal(),
    )


STAGE_CONFIG = "stage_config.yaml"


def own_process_command(cfg: DictConfig, directory: Path) -> list[str]:
    """`thinkforge-train` on exactly `cfg`, saved as `directory/stage_config.yaml`: how a stage runs as its own
    process (the pipeline's stages; the doctor's runs under FSDP, whose ranks relaunch from the command line)."""
    script = Path(sys.executable).with_name("thinkforge-train")
    found = str(script) if script.exists() else shutil.which("thinkforge-train")
    if found is None:
        raise RuntimeError("thinkforge-train is not installed in this environment (pip install -e .)")
    directory.mkdir(parents=True, exist_ok=True)
    schema = next(name for name, node in STAGE_SCHEMAS.items() if getattr(node, "_target_", None) == cfg.stage._target_)
    defaults = f"defaults:\n  - train_schema\n  - stage_schema@stage: {schema}\n  - _self_\n\n"
    (directory / STAGE_CONFIG).write_text(defaults + OmegaConf.to_yaml(cfg))
    return [
        found,
        "--config-dir",
        str(directory),
        "--config-name",
        Path(STAGE_CONFIG).stem,
        f"hydra.run.dir='{directory}'",
    ]


def draw_curves(run: TrainConfig, stage: Stage) -> Path | None:
    """The stage's curves.png, from whatever its CSV holds; a failure to draw never hides why the run stopped."""
    try:
        return stage_curves(Path(run.output_dir), title=f"{type(stage).__name__}: {run.output_dir}")
    except Exception as error:
        log.warning("curves.png not drawn: %s", error)
        return None


def run_stage(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Trains one stage (a dry run is the command line's); `callbacks` join the configured ones (the doctor times
    and interrupts runs with them)."""
    run = validate(cfg)
    check_train_paths(run)
    L.seed_everything(run.seed, workers=True, verbose=False)
    stage = build_stage(run)
    datamodule = stage.datamodule()
    datamodule.setup("fit")  # the data's rows are read and checked before anything is written
    if getattr(rank_zero_only, "rank", 0) == 0:  # FSDP's other ranks relaunch this command and read the same config
        record_run(cfg, task_overrides(), Path(run.output_dir))
    trainer = build_trainer(run, callbacks, has_val=stage.validates)
    checkpoint = resume_checkpoint(run)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(hyperparameters, dict)
    for logger in trainer.loggers:
        # MLflow's params cannot change: a continued run (more steps) keeps those it started with
        if checkpoint is None or not isinstance(logger, MLFlowLogger):
            logger.log_hyperparams({str(key): value for key, value in hyperparameters.items()})
    try:
        trainer.fit(stage, datamodule=datamodule, ckpt_path=checkpoint)
    finally:  # whatever the CSV holds when the run stops, for any reason; a rollout server stopped
        if stage.sampler is not None:
            stage.sampler.close()
        curves = draw_curves(run, stage) if trainer.is_global_zero else None
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics.update({f"heldout/{name}": value for name, value in stage.heldout_metrics.items()})
    metrics.update({f"heldout_start/{name}": value for name, value in stage.initial_heldout.items()})
    if trainer.is_global_zero:
        # `loss` is the progress bar's copy of train/loss
        summary = ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()) if name != "loss")
        print(f"[thinkforge] stage done after {trainer.global_step} steps: {summary}")
        points = describe_points(stage.heldout_history, stage.initial_heldout, run.heldout.keep_best)
        if points:
            print(f"[thinkforge] {points}")
        print(f"[thinkforge] HF export: {stage.export_dir}")
        if curves:
            print(f"[thinkforge] curves: {curves}")
    return RunResult(Path(run.output_dir), stage.export_dir, metrics)
