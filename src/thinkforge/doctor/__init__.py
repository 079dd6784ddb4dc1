"""`thinkforge-doctor`: the silent failures of RL and SFT trainers, checked on the user's own config in minutes.

One module per check (template, tool turns, splits, logprobs, grader, resume), each a function the test suite
also calls on the same stage code the run will use. Each check declares what it needs of the run (`Need`); a run
that cannot meet a need skips the check with that reason. Short training runs go through `run_stage` itself (`runs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from thinkforge.config import validate
from thinkforge.doctor.findings import Check, Finding, Need
from thinkforge.doctor.grader import grader_audit
from thinkforge.doctor.logprobs import LOGPROB_FAIL, LOGPROB_WARN, check_logprobs, sampler_trainer_gap
from thinkforge.doctor.resume import check_resume, resume_gap
from thinkforge.doctor.runs import InterruptAt, SimulatedKill, disk_usage, prune_runs
from thinkforge.doctor.splits import check_micro_batches, check_packing, check_ranks
from thinkforge.doctor.template import check_template
from thinkforge.doctor.tool_turns import NAME as TOOL_TURNS
from thinkforge.doctor.tool_turns import check_tool_turns
from thinkforge.preflight import check_train_paths
from thinkforge.training import build_stage

__all__ = [
    "LOGPROB_FAIL",
    "LOGPROB_WARN",
    "Finding",
    "InterruptAt",
    "SimulatedKill",
    "check_micro_batches",
    "check_template",
    "format_findings",
    "grader_audit",
    "resume_gap",
    "run_doctor",
    "sampler_trainer_gap",
]


def run_doctor(cfg: DictConfig, *, stand_in: bool = False) -> list[Finding]:
    """Every check on `cfg`; its short runs write under `output_dir`, the findings to `output_dir/doctor.json`.

    `stand_in`: the model is not the one the stage will start from (a pipeline's later stages, whose start is an
    export that does not exist yet). A stage that samples its own training data then cannot be run with it.
    """
    run = validate(cfg)
    check_train_paths(run)
    workdir = Path(run.output_dir)
    stage = build_stage(run)
    probe = stage.probe()
    golds = probe.gold_rows(64)
    prompts = [prompt for prompt, _ in golds]
    answers = [gold for _, gold in golds if isinstance(gold, str)]
    sampling = probe.sampling()
    documents = probe.packed_documents(16)
    unmet = {
        Need.TRAINING_RUN: "samples its training data from the previous stage's export"
        if stand_in and stage.items_need_model
        else None,
        Need.OWN_SAMPLES: None if sampling is not None else "this stage does not train on its own samples",
        Need.GOLD_ANSWERS: None
        if answers
        else f"this stage's data has {'tests, which the sandbox runs' if golds else 'no gold answers'}",
        Need.TWO_RANKS: None if run.hardware.strategy == "fsdp" else "one process",
        Need.PACKED_DOCUMENTS: None if documents else "this stage does not pack",
        Need.TOOLS: None if run.tools.enabled else "this run calls no tools",
    }
    checks = [
        Check("template and mask", frozenset(), lambda: check_template(probe)),
        Check("split: micro-batches", frozenset({Need.TRAINING_RUN}), lambda: check_micro_batches(cfg, workdir)),
        Check(
            "split: packed vs unpacked",
            frozenset({Need.PACKED_DOCUMENTS}),
            lambda: check_packing(probe, run, documents),
        ),
        Check(
            "split: ranks",
            frozenset({Need.TWO_RANKS, Need.TRAINING_RUN}),
            lambda: check_ranks(cfg, run, probe, workdir),
        ),
        Check(
            "sampler vs trainer log-probs",
            frozenset({Need.OWN_SAMPLES}),
            lambda: check_logprobs(run, stage.chat, sampling, prompts),  # type: ignore[arg-type]
        ),
        Check("grader audit", frozenset({Need.GOLD_ANSWERS}), lambda: grader_audit(answers)),
        Check(
            TOOL_TURNS,
            frozenset({Need.TOOLS}),
            lambda: check_tool_turns(stage.chat, run.tools, prompts[0] if prompts else "What is 6 * 7?"),
        ),
        Check("resume equivalence", frozenset({Need.TRAINING_RUN}), lambda: check_resume(cfg, run, workdir)),
    ]
    findings: list[Finding] = []
    peak_disk = 0
    for check in checks:
        reasons = [unmet[need] for need in Need if need in check.needs and unmet[need]]
        if reasons:
            advice = (
                "run thinkforge-doctor on that export once it exists" if unmet[Need.TRAINING_RUN] in reasons else ""
            )
            findings.append(Finding(check.name, "skip", str(reasons[0]), advice))
            continue
        try:
            result = check.run()
        except Exception as error:  # one broken check is reported; the others still run
            lines = str(error).strip().splitlines()
            result = Finding(check.name, "fail", f"{type(error).__name__}: {lines[-1][:200] if lines else ''}")
        findings.extend(result if isinstance(result, tuple) else [result])
        peak_disk = max(peak_disk, disk_usage(workdir))
        prune_runs(workdir)
    for finding in findings:
        if finding.check == "budget":
            finding.measured += (
                f"; the doctor's own runs took at most {peak_disk / 2**30:.2f} GiB of disk "
                "(their checkpoints and exports are deleted)"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "doctor.json").write_text(json.dumps([asdict(f) for f in findings], indent=2))
    return findings


def format_findings(findings: Sequence[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    lines = [f"{'check':<{width}}  status  measured / what to do"]
    for finding in findings:
        lines.append(f"{finding.check:<{width}}  {finding.status:<6}  {finding.measured}")
        if finding.advice:
            lines.append(f"{'':<{width}}          → {finding.advice}")
    return "\n".join(lines)
