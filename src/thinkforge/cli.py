"""Console entry points: thin Hydra mains over `thinkforge.train`, `.pipeline`, `.doctor` and `.eval`."""

from __future__ import annotations

from importlib import resources
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from thinkforge.config import register_configs


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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train_main(cfg: DictConfig) -> None:
    from thinkforge.console import quiet_console
    from thinkforge.train import run_stage

    quiet_console()
    run_stage(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="pipeline")
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
def doctor_main(cfg: DictConfig) -> None:
    from thinkforge.console import quiet_console
    from thinkforge.doctor import format_findings, run_doctor

    quiet_console()
    findings = run_doctor(cfg)
    print(format_findings(findings))
    if any(finding.status == "fail" for finding in findings):
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    from thinkforge.config import validate
    from thinkforge.eval import run_eval

    run = validate(cfg)
    if run.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return
    run_eval(run)
