"""Console entry points: thin Hydra mains over `thinkforge.train`, `.pipeline`, `.doctor` and `.eval`."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from thinkforge.config import UserError, validate
from thinkforge.preflight import check_eval_paths, check_train_paths
from thinkforge.stage_configs import register_configs


def config_dir() -> str:
    """The `conf/` shipped inside the wheel, or the repository's own `conf/` for an editable install."""
    packaged = resources.files("thinkforge") / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def _benchmark_of(samples_file: str | None, default: str) -> str:
    from thinkforge.eval import benchmark_of

    return benchmark_of(samples_file, default)


register_configs()
OmegaConf.register_new_resolver("benchmark_of", _benchmark_of, replace=True)


def one_line_errors(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A UserError (config value, data row, missing path) ends the command with one line on stderr and exit
    code 2, not a traceback; HYDRA_FULL_ERROR=1 keeps the traceback."""

    @functools.wraps(main)
    def reported(cfg: DictConfig) -> Any:
        try:
            return main(cfg)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            sys.exit(2)

    return reported


def prepared(cfg: DictConfig, check_paths: Callable[[Any], None]) -> Any | None:
    """The validated config, its paths checked; None after a dry run printed it. Runs before the training
    libraries are imported, so a dry run or a config error takes seconds."""
    run = validate(cfg)
    check_paths(run)
    if run.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    return run


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_line_errors
def train_main(cfg: DictConfig) -> None:
    if prepared(cfg, check_train_paths) is None:
        return
    from thinkforge.console import quiet_console
    from thinkforge.train import run_stage

    quiet_console()
    run_stage(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="pipeline")
@one_line_errors
def _pipeline_hydra_main(cfg: DictConfig) -> None:
    from thinkforge.pipeline import run_pipeline

    run_pipeline(cfg)


# Keys no schema lists: `stages.<name>.<key>=value` (what a recipe does not set) and the pipeline-wide
# `data.<key>=value`; Hydra's struct mode only adds such keys with `++`.
OPEN_KEY_OVERRIDE = re.compile(r"^(stages\.[^.=]+|data)\.[^=]+=")


def pipeline_main() -> None:
    sys.argv = [sys.argv[0]] + [f"++{arg}" if OPEN_KEY_OVERRIDE.match(arg) else arg for arg in sys.argv[1:]]
    _pipeline_hydra_main()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="doctor")
@one_line_errors
def doctor_main(cfg: DictConfig) -> None:
    from thinkforge.console import quiet_console
    from thinkforge.doctor import format_findings, run_doctor

    quiet_console()
    findings = run_doctor(cfg)
    print(format_findings(findings))
    if any(finding.status == "fail" for finding in findings):
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_line_errors
def eval_main(cfg: DictConfig) -> None:
    run = prepared(cfg, check_eval_paths)
    if run is None:
        return
    from thinkforge.eval import run_eval

    run_eval(run)
