"""thinkforge from Python: a stage, a pipeline or an evaluation from the overrides a command line takes, run in this
process. The same composition, checks and run directories as `thinkforge-train`, `thinkforge-pipeline` and
`thinkforge-eval`; a bad override or row raises the `UserError` whose one line the command would print.

    import thinkforge

    sft = thinkforge.train("stage=sft", "trainer.max_steps=20")
    grpo = thinkforge.train("experiment=demo_grpo", "model=pretrained", f"model.name_or_path={sft.export_dir}")
    print(grpo.output_dir, grpo.metrics["heldout/accuracy"])
"""

from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

import thinkforge.cli  # noqa: F401  (registers the schemas and resolvers the configs compose with)
from thinkforge.config import config_dir
from thinkforge.errors import ConfigError
from thinkforge.keys import explain_composition_error


def composed(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """The config a command composes from `overrides`, its `output_dir` the directory the command would use
    (`hydra.run.dir`, e.g. logs/<stage>/runs/<time>, relative to the working directory)."""
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
            with open_dict(cfg):
                del cfg["hydra"]
                if OmegaConf.is_interpolation(cfg, "output_dir"):
                    cfg.output_dir = run_dir
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(explain_composition_error(error) or str(error)) from None
    return cfg


def train(*overrides: str) -> Any:
    """Trains one stage as `thinkforge-train <overrides>` would; returns its `RunResult` (output_dir, export_dir,
    metrics)."""
    from thinkforge.console import quiet_console
    from thinkforge.training import run_stage

    quiet_console()
    return run_stage(composed("train", overrides))


def pipeline(*overrides: str) -> list[dict[str, Any]]:
    """Runs a recipe as `thinkforge-pipeline <overrides>` would; returns each stage's record."""
    from thinkforge.pipeline import run_pipeline

    return run_pipeline(composed("pipeline", overrides))


def evaluate(*overrides: str) -> dict[str, float]:
    """Evaluates as `thinkforge-eval <overrides>` would; returns its summary (pass@k, maj@k, ...)."""
    from thinkforge.config import validate
    from thinkforge.eval import run_eval
    from thinkforge.preflight import check_eval_paths

    cfg = validate(composed("eval", overrides))
    check_eval_paths(cfg)
    return run_eval(cfg)
