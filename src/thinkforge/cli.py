"""Console entry points: thin Hydra mains over `thinkforge.training`, `.pipeline`, `.doctor` and `.eval`."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from thinkforge.config import config_dir, validate
from thinkforge.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USER_ERROR, Interrupted, UserError
from thinkforge.keys import explain_composition_error
from thinkforge.preflight import check_eval_paths, check_train_paths
from thinkforge.run_record import record_run, remove_if_empty, task_overrides
from thinkforge.stage_configs import register_configs


def _benchmark_of(samples_file: str | None, default: str) -> str:
    from thinkforge.eval import benchmark_of

    return benchmark_of(samples_file, default)


register_configs()
OmegaConf.register_new_resolver("benchmark_of", _benchmark_of, replace=True)


#: whether the user asked for tracebacks (HYDRA_FULL_ERROR=1) rather than one-line errors
_tracebacks_asked = False


def command(hydra_main: Callable[[], Any]) -> Callable[[], None]:
    """A console command around a Hydra main: what Hydra refuses while composing (an unknown key or option, a
    value of the wrong type) and every `UserError` end it with one line on stderr and exit code 2; a stop asked
    for from outside (Ctrl-C, SIGTERM) with exit code 130. HYDRA_FULL_ERROR=1 keeps the tracebacks."""

    @functools.wraps(hydra_main)
    def main() -> None:
        global _tracebacks_asked
        _tracebacks_asked = os.environ.get("HYDRA_FULL_ERROR") == "1"
        # Hydra then raises what it refuses instead of printing its own several-line report; the job restores
        # the variable before it starts any process of its own
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            hydra_main()
        except (Interrupted, KeyboardInterrupt) as stop:
            name = stop.signal_name if isinstance(stop, Interrupted) else "SIGINT"
            print(f"interrupted by {name}: what was computed is kept; the same command resumes", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except (HydraException, OmegaConfBaseException, UserError) as error:
            line = str(error) if isinstance(error, UserError) else explain_composition_error(error)
            if _tracebacks_asked or line is None:
                raise
            print(f"error: {' '.join(line.split())}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        finally:
            _restore_full_error_variable()

    return main


def _restore_full_error_variable() -> None:
    if _tracebacks_asked:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    else:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def one_line_errors(job: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """The job of a command: a UserError raised in it (config value, data row, missing path) ends the command
    with one line and exit code 2, as one raised while composing does (Hydra would report it as a crash)."""

    @functools.wraps(job)
    def reported(cfg: DictConfig) -> Any:
        _restore_full_error_variable()
        try:
            return job(cfg)
        except UserError as error:
            remove_if_empty(Path(cfg.output_dir))
            if _tracebacks_asked:
                raise
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return reported


def prepared(cfg: DictConfig, check_paths: Callable[[Any], None], *, record: bool = True) -> Any | None:
    """The validated config, its paths checked; None after a dry run printed it. Runs before the training
    libraries are imported, so a dry run or a config error takes seconds."""
    run = validate(cfg)
    check_paths(run)
    if run.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        remove_if_empty(Path(run.output_dir))
        return None
    if record:
        record_run(cfg, task_overrides(), Path(run.output_dir))
    return run


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_line_errors
def _train(cfg: DictConfig) -> None:
    if prepared(cfg, check_train_paths, record=False) is None:  # `run_stage` records it once its data is read
        return
    from thinkforge.console import quiet_console
    from thinkforge.training import run_stage

    quiet_console()
    run_stage(cfg)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="pipeline")
@one_line_errors
def _pipeline(cfg: DictConfig) -> None:
    from thinkforge.pipeline import run_pipeline

    run_pipeline(cfg)


# Keys no schema lists: `stages.<name>.<key>=value` (what a recipe does not set) and the pipeline-wide
# `data.<key>=value`; Hydra's struct mode only adds such keys with `++`.
OPEN_KEY_OVERRIDE = re.compile(r"^(stages\.[^.=]+|data)\.[^=]+=")


def pipeline_main() -> None:
    sys.argv = [sys.argv[0]] + [f"++{arg}" if OPEN_KEY_OVERRIDE.match(arg) else arg for arg in sys.argv[1:]]
    command(_pipeline)()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="doctor")
@one_line_errors
def _doctor(cfg: DictConfig) -> None:
    from thinkforge.console import quiet_console
    from thinkforge.doctor import format_findings, run_doctor

    quiet_console()
    findings = run_doctor(cfg)
    print(format_findings(findings))
    if any(finding.status == "fail" for finding in findings):
        sys.exit(EXIT_FAILED)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_line_errors
def _eval(cfg: DictConfig) -> None:
    run = prepared(cfg, check_eval_paths)
    if run is None:
        return
    from thinkforge.eval import run_eval

    run_eval(run)


train_main = command(_train)
doctor_main = command(_doctor)
eval_main = command(_eval)
