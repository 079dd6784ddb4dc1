"""A recipe as a sequence of stage runs: each stage's HF export is the next stage's model.

Every stage's train config is composed and validated before the first one starts, so a typo in the last stage
fails in seconds, not after hours of mid-training. Each stage then runs as its own `thinkforge-train` process on
the exact config saved in its directory (`stage_config.yaml`), which keeps multi-process strategies, memory and
failures per stage. A stage directory records a fingerprint of its config and of everything upstream; on re-run
a finished stage with the same fingerprint is skipped, an interrupted one resumes from its last checkpoint, and
one whose config changed is moved aside and run again. Resuming itself is `thinkforge-train`'s own `ckpt_path=last`
in the stage directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from thinkforge.config import PipelineConfig, validate
from thinkforge.curves import pipeline_curves
from thinkforge.errors import EXIT_INTERRUPTED, ConfigError, Interrupted, UserError
from thinkforge.keys import explain_composition_error
from thinkforge.preflight import check_train_paths
from thinkforge.run_record import record_run, task_overrides
from thinkforge.stages.export import BEST_EXPORT
from thinkforge.stages.heldout import BEST_SCORES
from thinkforge.training import own_process_command

log = logging.getLogger(__name__)

RECORD = "pipeline_stage.json"


class StageFailed(UserError):
    """A stage's own process failed; it printed why, so the pipeline adds one line, not its own traceback."""


@dataclass
class PlannedStage:
    name: str
    config: DictConfig
    directory: Path
    fingerprint: str
    #: the stage whose export this one starts from; None for the first, which starts from the pipeline's model
    source: str | None = None
    #: what the stages after this one start from: its last step's export or its best held-out point's
    hands_over: str = "last"

    @property
    def export_dir(self) -> Path:
        return self.directory / "export"

    @property
    def handed_over(self) -> Path:
        """The export the stages after this one start from (`stages.<name>.export`)."""
        return self.directory / BEST_EXPORT if self.hands_over == "best" else self.export_dir

    @property
    def last_checkpoint(self) -> Path:
        return self.directory / "checkpoints" / "last.ckpt"

    def record(self) -> dict[str, Any] | None:
        path = self.directory / RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def write_record(self, **fields: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"stage": self.name, "fingerprint": self.fingerprint, **fields}
        (self.directory / RECORD).write_text(json.dumps(record, indent=2))


def compose_stage(
    name: str, entry: dict[str, Any], pipeline: DictConfig, directory: Path, previous_export: Path | None
) -> DictConfig:
    """The train config of one stage: its overrides composed like a `thinkforge-train` command line, then the
    pipeline's model and hardware, the handoff from the previous stage, the entry's own values, and the
    pipeline-wide data settings on top."""
    values = {key: value for key, value in entry.items() if key not in ("overrides", "init_from", "export")}
    try:
        cfg = compose("train", overrides=list(entry.get("overrides", [])))
        with open_dict(cfg):
            # resolved here: the stage runs as its own process, where `${hydra:launcher...}` means nothing
            cfg.model = OmegaConf.merge(cfg.model, OmegaConf.to_container(pipeline.model, resolve=True))
            cfg.hardware = OmegaConf.merge(cfg.hardware, OmegaConf.to_container(pipeline.hardware, resolve=True))
            if previous_export is not None:
                cfg.model.name_or_path, cfg.model.config, cfg.model.tokenizer = str(previous_export), None, None
            cfg.seed = cfg.data.seed = cfg.model.init_seed = pipeline.seed
            cfg.output_dir = str(directory)
        merged = OmegaConf.merge(
            cfg, values, {"data": OmegaConf.to_container(pipeline.data, resolve=True)} if pipeline.get("data") else {}
        )
        assert isinstance(merged, DictConfig)
        cfg = merged
        validate(cfg)
    except (HydraException, OmegaConfBaseException, ConfigError) as error:
        raise ConfigError(f"stages.{name}: {explain_composition_error(error) or error}") from None
    return cfg


def plan(pipeline: DictConfig) -> list[PlannedStage]:
    run: PipelineConfig = validate(pipeline)
    root = Path(run.output_dir).resolve()
    planned: dict[str, PlannedStage] = {}
    for name, entry in run.stages.items():
        source = planned[entry.get("init_from") or list(planned)[-1]] if planned else None
        cfg = compose_stage(name, entry, pipeline, root / name, source.handed_over if source else None)
        upstream = source.fingerprint + source.hands_over if source else ""
        fingerprint = hashlib.sha256((upstream + OmegaConf.to_yaml(cfg)).encode()).hexdigest()[:16]
        hands_over = entry.get("export", "last")
        planned[name] = PlannedStage(name, cfg, root / name, fingerprint, source.name if source else None, hands_over)
    return list(planned.values())


def run_forwarding_stops(command: list[str]) -> int:
    """Runs a stage's process, passing it any stop signal this process gets (`timeout` and `kill` reach this
    process alone), and waits for it to save and exit; its exit code."""
    process = subprocess.Popen(command)

    def forward(signum: int, frame: Any) -> None:
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_one(stage: PlannedStage, position: str = "") -> dict[str, Any]:
    """Runs, resumes or skips one stage (`position`: e.g. "stage 2 of 4"); returns its finished record."""
    label = f"{position}, {stage.name}" if position else stage.name
    record = stage.record()
    if record and record["fingerprint"] != stage.fingerprint:
        stale = stage.directory.with_name(f"{stage.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        stage.directory.rename(stale)
        print(f"[pipeline] {label}: config or an upstream stage changed; previous run moved to {stale}", flush=True)
        record = None
    if record and record["status"] == "done" and stage.handed_over.exists():
        print(f"[pipeline] {label}: already done ({stage.directory}), skipped", flush=True)
        return {**record, "from": stage.source}
    resume = record is not None and stage.last_checkpoint.exists()
    stage.directory.mkdir(parents=True, exist_ok=True)
    command = own_process_command(stage.config, stage.directory)
    print(
        f"[pipeline] {label}: {'resuming from ' + str(stage.last_checkpoint) if resume else 'starting'}",
        flush=True,
    )
    stage.write_record(status="running")
    started = time.monotonic()
    returncode = run_forwarding_stops(command)
    if returncode in (EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
        stage.write_record(status="interrupted", seconds=round(time.monotonic() - started, 1))
        raise Interrupted(f"a stop of stage {stage.name}")
    if returncode != 0:
        stage.write_record(status="failed", exit_code=returncode)
        raise StageFailed(
            f"stage {stage.name} failed (exit code {returncode}); its output is above, logs in {stage.directory}"
        )
    heldout_file, best_file = stage.directory / "heldout.json", stage.directory / BEST_SCORES
    heldout = json.loads(heldout_file.read_text()) if heldout_file.exists() else {}
    done = {
        "status": "done",
        "seconds": round(time.monotonic() - started, 1),
        "heldout": heldout,
        "export": str(stage.handed_over),
    }
    if best_file.exists():  # heldout.keep_best: the best held-out point, beside the last step's scores
        done["best"] = json.loads(best_file.read_text())
    stage.write_record(**done)
    return {"stage": stage.name, "fingerprint": stage.fingerprint, "from": stage.source, **done}


def format_table(records: list[dict[str, Any]]) -> str:
    """Greedy pass@1, then (when measured) the sampled pass@1 and pass@k that show what RL had to work with. A row
    names the stage it started from unless that is the row above and nothing else starts from it, so a column
    read top to bottom is not mistaken for one chain (the demo's dpo and grpo both start from sft)."""
    sampled = sorted({name for record in records for name in (record.get("heldout") or {}) if name.startswith("pass@")})
    columns = [("accuracy", "held-out pass@1 (greedy)"), ("eos_rate", "EOS rate"), ("mean_length", "mean length")]
    columns += [("sampled_accuracy", "sampled pass@1")] * bool(sampled) + [(name, name) for name in sampled]
    if any("tool_calls" in (record.get("heldout") or {}) for record in records):
        columns.append(("tool_calls", "tool calls per sample"))
    kept_best = any("best" in record for record in records)
    lines = [
        "| after | "
        + " | ".join(title for _, title in columns)
        + (" | best held-out point" if kept_best else "")
        + " | wall (s) | export |",
        "|---" * (len(columns) + 3 + kept_best) + "|",
    ]
    starts = Counter(record.get("from") for record in records)
    for previous, record in zip([None, *records], records):
        heldout = record.get("heldout") or {}
        cells = [
            "-"
            if name not in heldout
            else f"{heldout[name]:.2f}"
            if name == "tool_calls"
            else f"{heldout[name]:.1f}"
            if name == "mean_length"
            else f"{heldout[name]:.1%}"
            for name, _ in columns
        ]
        start = record.get("from")
        chained = start is None or (previous is not None and previous["stage"] == start and starts[start] == 1)
        label = record["stage"] if chained else f"{record['stage']} (from {start})"
        if kept_best:
            best = record.get("best")
            cells.append(f"{best['metric']} {best[best['metric']]:.1%} (step {best['step']})" if best else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {record.get('seconds', '-')} | {record['export']} |")
    return "\n".join(lines)


def doctor_stages(pipeline: DictConfig, stages: list[PlannedStage]) -> bool:
    """`thinkforge-doctor` on every stage's config. A stage that starts from an earlier stage's export (not there
    yet) is checked with the recipe's own model standing in. True when no check failed."""
    from thinkforge.doctor import format_findings, run_doctor

    healthy = True
    for stage in stages:
        cfg = stage.config.copy()
        stand_in = cfg.model.name_or_path is not None and Path(cfg.model.name_or_path).resolve().is_relative_to(
            stage.directory.parent
        )
        with open_dict(cfg):
            if stand_in:
                cfg.model = OmegaConf.merge(cfg.model, OmegaConf.to_container(pipeline.model, resolve=True))
            cfg.output_dir = str(Path(pipeline.output_dir) / "doctor" / stage.name)
        findings = run_doctor(cfg, stand_in=stand_in)
        healthy &= not any(finding.status == "fail" for finding in findings)
        model = "the recipe's model standing in for the previous export" if stand_in else "its own starting model"
        print(f"\n[doctor] stage {stage.name} ({model}):\n{format_findings(findings)}", flush=True)
    return healthy


def overview(stages: list[PlannedStage]) -> str:
    """One line per stage: what it trains, from what, on what, for how long, how fast, how long its sequences."""
    lines = ["| stage | trains | from | data | steps | lr | lengths |", "|---|---|---|---|---|---|---|"]
    for stage in stages:
        cfg = stage.config
        source = cfg.model.name_or_path or "model.config"
        if Path(source).name in ("export", BEST_EXPORT):  # an earlier stage's export: that stage's name
            source = Path(source).parent.name + (" (best)" if Path(source).name == BEST_EXPORT else "")
        if "max_prompt_length" in cfg.stage:
            lengths = f"prompts {cfg.stage.max_prompt_length}, completions {cfg.stage.sampling.max_new_tokens}"
        else:
            lengths = f"sequences {cfg.data.max_sequence_length}"
        data = cfg.data.train if cfg.data.train != "synthetic" else f"synthetic ({cfg.data.synthetic.num_train} rows)"
        lines.append(
            f"| {stage.name} | {cfg.stage._target_.rsplit('.', 1)[1]} | {source} | {data} | {cfg.trainer.max_steps} "
            f"| {cfg.optim.lr:g} | {lengths} |"
        )
    return "\n".join(lines)


def check_paths(stages: list[PlannedStage]) -> None:
    """Every stage's data, model and checkpoint paths, before the first stage runs; a stage may start from an
    export an earlier stage will write."""
    exports: set[Path] = set()
    for stage in stages:
        try:
            check_train_paths(validate(stage.config), will_exist=exports)
        except ConfigError as error:
            raise ConfigError(f"stages.{stage.name}: {error}") from None
        exports.add(stage.handed_over.resolve())


def run_pipeline(pipeline: DictConfig) -> list[dict[str, Any]]:
    stages = plan(pipeline)
    check_paths(stages)
    if pipeline.dry_run:
        print(
            f"[pipeline] {pipeline.name}: {len(stages)} stages composed and validated -> {pipeline.output_dir}\n"
            f"{overview(stages)}"
        )
        if pipeline.verbose:
            for stage in stages:
                print(f"# ---- stage {stage.name} -> {stage.directory}\n{OmegaConf.to_yaml(stage.config)}")
        return []
    record_run(pipeline, task_overrides(), Path(pipeline.output_dir), replaces_differing=True)
    if pipeline.doctor:
        if not doctor_stages(pipeline, stages):
            sys.exit(1)
        return []
    records: list[dict[str, Any]] = []
    try:
        for number, stage in enumerate(stages, 1):
            records.append(run_one(stage, f"stage {number} of {len(stages)}"))
    finally:  # the stages done so far, however the pipeline stops
        if records:
            report(pipeline, records, stages)
    return records


def report(pipeline: DictConfig, records: list[dict[str, Any]], stages: list[PlannedStage]) -> None:
    """summary.md, curves.png and the printed table of the stages in `records`."""
    table = format_table(records)
    summary = Path(pipeline.output_dir) / "summary.md"
    done = {record["stage"] for record in records}
    directories = [stage.directory for stage in stages if stage.name in done]
    curves = pipeline_curves(records, directories, summary.with_name("curves.png"), title=pipeline.name)
    summary.write_text(
        f"# {pipeline.name} (seed {pipeline.seed})\n\n{pipeline.description}\n\n{table}\n\n![curves]({curves.name})\n"
    )
    print(
        f"\n[pipeline] {pipeline.name}: held-out results after each stage (also in {summary}, {curves})\n{table}",
        flush=True,
    )
