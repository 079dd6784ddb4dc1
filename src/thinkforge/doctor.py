"""`thinkforge-doctor`: the silent failures of RL and SFT trainers, checked on the user's own config in minutes.

Each check is a function the test suite also calls, on the same stage code the run will use:
template and loss mask, split invariance of the loss and gradient, sampler-vs-trainer log-probs, the grader on
the user's gold answers, resume equivalence, and a budget estimate. Short training runs go through `run_stage`
itself, a few steps each, in the doctor's own directory.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.config import TrainConfig, validate
from thinkforge.csv_log import read_csv_log
from thinkforge.data.packing import IGNORE_INDEX, TokenSequence, collate_rows, pack
from thinkforge.losses import causal_lm_loss
from thinkforge.preflight import check_train_paths
from thinkforge.rewards.grading import Gold
from thinkforge.rewards.math import gold_is_parseable, math_accuracy_many
from thinkforge.rollout import HFEngine, RolloutEngine, SamplingConfig
from thinkforge.stages.probe import StageProbe, formatted_answer
from thinkforge.train import build_stage, own_process_command, run_stage

SPLIT_TOLERANCE = 1e-5
LOGPROB_WARN, LOGPROB_FAIL = 1e-2, 1e-1
Verifier = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class Finding:
    check: str
    status: str  # pass | warn | fail | skip
    measured: str
    advice: str = ""


# ---- 1. template and loss mask ---------------------------------------------------------------------------------
def marked(tokenizer: Any, sequence: TokenSequence, limit: int = 160) -> str:
    """The sequence's text with every run of tokens that carry loss inside [brackets], cut to its last `limit`
    characters. Runs are decoded whole, so a character split across byte-level tokens stays whole."""
    targets = [False] + [label != IGNORE_INDEX for label in sequence.labels[:-1]]
    parts, start = [], 0
    for end in range(1, len(targets) + 1):
        if end == len(targets) or targets[end] != targets[start]:
            text = tokenizer.decode(list(sequence.input_ids[start:end]), skip_special_tokens=False)
            parts.append(f"[{text}]" if targets[start] else text)
            start = end
    text = "".join(parts).replace("\n", "⏎")
    return "…" + text[-limit:] if len(text) > limit else text


def mask_problems(tokenizer: Any, prompt_ids: Sequence[int], sequence: TokenSequence, end_id: int | None) -> list[str]:
    """What is wrong with one trained sequence: prompt tokens that are targets, or a reply that never ends."""
    targets = [i + 1 for i, label in enumerate(sequence.labels) if label != IGNORE_INDEX]
    problems = []
    if tuple(sequence.input_ids[: len(prompt_ids)]) != tuple(prompt_ids):
        problems.append("the generation prompt is not a prefix of the training text")
    if any(position < len(prompt_ids) for position in targets):
        problems.append("prompt tokens carry loss")
    if not targets:
        problems.append("no token carries loss")
    elif end_id is not None and end_id not in {sequence.input_ids[position] for position in targets}:
        problems.append(
            f"the reply's end token {tokenizer.convert_ids_to_tokens(end_id)!r} is not a target: "
            "the model never learns to stop"
        )
    return problems


def check_template(probe: StageProbe, examples: int = 2) -> Finding:
    """The sequences the stage trains, built as it builds them: prompts carry no loss, the reply's end token does."""
    tokenizer = probe.tokenizer
    cases = probe.examples(examples)
    if not cases:
        return Finding("template and mask", "skip", "no training example to render")
    problems = sorted(
        {problem for case in cases for problem in mask_problems(tokenizer, case.prompt_ids, case.sequence, case.end_id)}
    )
    example = marked(tokenizer, cases[0].sequence)
    if problems:
        return Finding(
            "template and mask",
            "fail",
            f"{'; '.join(problems)}: {example}",
            "fix the chat template or data.system_prompt so each reply ends with the turn's end token",
        )
    return Finding("template and mask", "pass", f"{len(cases)} examples, targets in []: {example}")


# ---- 2. split invariance ---------------------------------------------------------------------------------------
def train_briefly(
    cfg: DictConfig, directory: Path, overrides: Sequence[str], *, interrupt_at: int | None = None
) -> dict[int, dict[str, float]]:
    """step -> logged train metrics of a short run of `cfg` with `overrides`, trained as the real run would be:
    by `run_stage` in this process, or as its own `thinkforge-train` process for multi-process strategies (they
    relaunch their ranks from the command line). `interrupt_at` stops it before that step, as a kill would."""
    run_cfg = with_values(cfg, directory, overrides)
    if interrupt_at is not None:
        with open_dict(run_cfg):
            run_cfg.callbacks = {
                **(run_cfg.callbacks or {}),
                "doctor_interrupt": {"_target_": "thinkforge.doctor.InterruptAt", "step": interrupt_at},
            }
    if validate(run_cfg).hardware.strategy == "fsdp":
        result = subprocess.run(own_process_command(run_cfg, directory), capture_output=True, text=True)
        if result.returncode != 0 and interrupt_at is None:
            lines = result.stderr.strip().splitlines()
            raise RuntimeError(f"{directory.name}: {lines[-1] if lines else 'failed'}")
    else:
        try:
            run_stage(run_cfg)
        except Interrupted:
            if interrupt_at is None:
                raise
    return read_steps(directory)


def first_step(cfg: DictConfig, directory: Path, *overrides: str) -> dict[str, float]:
    """train/loss and train/grad_norm of one step of `cfg` with `overrides`."""
    row = train_briefly(cfg, directory, [*overrides, "trainer.max_steps=1"])[0]
    return {"loss": row["train/loss"], "grad_norm": row["train/grad_norm"]}


def relative_gap(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)


def check_micro_batches(cfg: DictConfig, workdir: Path) -> Finding:
    """One micro-batch per rank vs the smallest micro-batches: the same global batch, the same loss and gradient."""
    run = validate(cfg)
    world = run.hardware.devices * run.hardware.num_nodes
    whole = run.data.batch_size // world
    if whole == 1:
        return Finding("split: micro-batches", "skip", "one sample per rank: nothing to split")
    one = first_step(cfg, workdir / "split_one", f"data.micro_batch_size={whole}")
    many = first_step(cfg, workdir / "split_many", "data.micro_batch_size=1")
    if one["grad_norm"] == 0 and many["grad_norm"] == 0:
        return Finding(
            "split: micro-batches",
            "warn",
            "the first step has no gradient (for RL: no group with a reward spread)",
            "nothing to compare; run the doctor from a checkpoint that already solves some prompts",
        )
    gap = relative_gap(many, one)
    measured = (
        f"1 x {whole} vs {whole} x 1 per rank: loss {one['loss']:.6g} / {many['loss']:.6g}, relative gap {gap:.1e}"
    )
    if gap > SPLIT_TOLERANCE:
        return Finding(
            "split: micro-batches",
            "fail",
            measured,
            "the loss is not the global mean: gradient accumulation weights micro-batches unequally",
        )
    return Finding("split: micro-batches", "pass", measured)


def packed_vs_unpacked(model: CausalLM, documents: Sequence[TokenSequence], row_length: int, pad_id: int) -> float:
    """Relative gap of the token-mean loss and its gradient norm between packed rows and one document per row."""
    results = []
    for rows in (pack(documents, row_length), [[document] for document in documents]):
        model.zero_grad(set_to_none=True)
        batch = collate_rows(rows, pad_id, row_length=row_length, flatten=False)
        logprobs, _ = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        loss = causal_lm_loss(logprobs, batch["labels"]).mean()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
        results.append({"loss": float(loss.detach()), "grad_norm": float(norm)})
    model.zero_grad(set_to_none=True)
    return relative_gap(results[0], results[1])


def check_packing(probe: StageProbe, run: TrainConfig) -> Finding:
    sequences = probe.packed_documents(16)
    if not sequences:
        return Finding("split: packed vs unpacked", "skip", "this stage does not pack")
    model = CausalLM(load_hf_model(run.model, probe.tokenizer, param_dtype=torch.float32), run.model.logprob_chunk_size)
    gap = packed_vs_unpacked(model, sequences, run.data.max_sequence_length, probe.tokenizer.pad_token_id)
    measured = f"{len(sequences)} documents: relative gap of loss and gradient norm {gap:.1e}"
    if gap > SPLIT_TOLERANCE:
        return Finding(
            "split: packed vs unpacked",
            "fail",
            measured,
            "packed documents attend to each other: the attention backend ignores position_ids",
        )
    return Finding("split: packed vs unpacked", "pass", measured)


def check_ranks(cfg: DictConfig, probe: StageProbe, workdir: Path) -> Finding:
    run = validate(cfg)
    if run.hardware.strategy != "fsdp":
        return Finding("split: ranks", "skip", "one process")
    if probe.samples_per_rank:
        return Finding("split: ranks", "skip", "each rank samples its own rollouts: another split samples other ones")
    sharded = first_step(cfg, workdir / "ranks_all")
    alone = first_step(
        cfg, workdir / "ranks_one", "hardware.strategy=single", "hardware.devices=1", "hardware.num_nodes=1"
    )
    gap = relative_gap(sharded, alone)
    world = run.hardware.devices * run.hardware.num_nodes
    measured = f"{world} ranks vs 1: relative gap {gap:.1e}"
    status = "fail" if gap > SPLIT_TOLERANCE else "pass"
    return Finding(
        "split: ranks",
        status,
        measured,
        "the loss is averaged per rank, not over the global batch" if status == "fail" else "",
    )


# ---- 3. sampler vs trainer log-probs -----------------------------------------------------------------------------
def sampler_trainer_gap(
    model: CausalLM,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    score_temperature: float | None = None,
    engine: RolloutEngine | None = None,
) -> float:
    """Mean |log p_sampler − log p_trainer| per completion token: the engine's recorded log-probs (HF generate on
    `model` unless another engine is given) against the training forward pass at `score_temperature` (the
    sampling temperature unless told otherwise)."""
    groups = (engine or HFEngine(model, tokenizer)).generate(prompts, sampling, seed=0)
    temperature = score_temperature or sampling.temperature
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, group in zip(prompts, groups):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for rollout in group:
                if not rollout.token_ids:
                    continue
                ids = list(prompt_ids) + list(rollout.token_ids)
                sequence = TokenSequence.causal(ids, [False] * len(prompt_ids) + [True] * len(rollout.token_ids))
                logps, _ = model(
                    torch.tensor([sequence.input_ids]), torch.tensor([sequence.labels]), temperature=temperature
                )
                trainer_side = logps[0, len(prompt_ids) - 1 : len(ids) - 1]
                total += (trainer_side - torch.tensor(rollout.logprobs)).abs().sum().item()
                count += len(rollout.logprobs)
    return total / max(count, 1)


def check_logprobs(probe: StageProbe, run: TrainConfig, prompts: list[str]) -> Finding:
    sampling = probe.sampling()
    if sampling is None:
        return Finding("sampler vs trainer log-probs", "skip", "this stage does not train on its own samples")
    model = CausalLM(load_hf_model(run.model, probe.tokenizer, param_dtype=torch.float32), run.model.logprob_chunk_size)
    engine = None
    if run.rollout.engine == "vllm":
        from thinkforge.rollout.vllm import VLLMEngine

        engine = VLLMEngine(
            run.model.name_or_path,
            probe.tokenizer,
            run.rollout,
            max_model_len=run.stage.longest_prompt(run.data) + sampling.max_new_tokens,
            seed=0,
        )
    gap = sampler_trainer_gap(model, probe.tokenizer, prompts[:4], sampling, engine=engine)
    measured = (
        f"{run.rollout.engine} engine: mean |Δ log p| {gap:.1e} per token "
        f"at T={sampling.temperature}, top_p={sampling.top_p}"
    )
    if gap < LOGPROB_WARN:
        return Finding("sampler vs trainer log-probs", "pass", measured)
    advice = (
        "the trainer scores another distribution than the sampler drew from: importance ratios and clipping refer "
        "to the wrong policy (top_p < 1 renormalises the sampler only; use top_p=1 for RL)"
    )
    return Finding("sampler vs trainer log-probs", "warn" if gap < LOGPROB_FAIL else "fail", measured, advice)


# ---- 4. grader audit ------------------------------------------------------------------------------------------
def gaming_shapes(gold: str) -> dict[str, str]:
    """Completions that must score 0 for this gold answer, whatever else the grader accepts."""
    other = "0" if gold.strip() != "0" else "1"
    return {
        "hedged boxes": f"<think>\nmaybe\n</think>\n\\boxed{{{gold}}} or \\boxed{{{other}}}",
        "answer only in <think>": f"<think>\nit is \\boxed{{{gold}}}\n</think>\nI am not sure.",
        "unclosed <think>": f"<think>\nit is \\boxed{{{gold}}}",
    }


def grader_audit(golds: Sequence[str], verifier: Verifier = math_accuracy_many) -> Finding:
    parseable = [gold for gold in golds if gold_is_parseable(gold)]
    skipped = 1 - len(parseable) / max(len(golds), 1)
    formatted = [formatted_answer(gold) for gold in parseable]
    started = time.perf_counter()
    right = verifier(formatted, parseable)
    shapes = [(name, text, gold) for gold in parseable for name, text in gaming_shapes(gold).items()]
    gamed = verifier([text for _, text, _ in shapes], [gold for _, _, gold in shapes])
    seconds = time.perf_counter() - started
    slowest = max(
        (timed_check(verifier, text, gold) for text, gold in zip(formatted[:16], parseable[:16])), default=0.0
    )
    accepted = sum(score >= 1 for score in right) / max(len(parseable), 1)
    gamers = sorted({name for (name, _, _), score in zip(shapes, gamed) if score >= 1})
    measured = (
        f"{len(golds)} golds: {skipped:.0%} unparseable (skipped), formatted gold accepted {accepted:.0%}, "
        f"gaming shapes accepted: {', '.join(gamers) or 'none'}; "
        f"{len(formatted) + len(shapes)} checks in {seconds:.1f} s, "
        f"slowest {slowest * 1e3:.0f} ms"
    )
    if gamers or accepted < 0.99:
        return Finding(
            "grader audit",
            "fail",
            measured,
            "the reward can be gamed"
            if gamers
            else "correct answers score 0: check data.fields.answer and the gold format",
        )
    if skipped > 0.05:
        return Finding(
            "grader audit", "warn", measured, "prompts with unparseable gold answers are skipped in training"
        )
    return Finding("grader audit", "pass", measured)


def timed_check(verifier: Verifier, text: str, gold: str) -> float:
    started = time.perf_counter()
    verifier([text], [gold])
    return time.perf_counter() - started


def check_grader(golds: list[Gold]) -> Finding:
    answers = [gold for gold in golds if isinstance(gold, str)]
    if not answers:
        what = "tests, which the sandbox runs" if golds else "no gold answers"
        return Finding("grader audit", "skip", f"this stage's data has {what}")
    return grader_audit(answers)


# ---- 5. resume equivalence and 6. budget ------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for a killed run: raised before a step, after the checkpoint of the step before was written."""


class InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, stage, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"interrupted at step {self.step}")


def resume_gap(cfg: DictConfig, workdir: Path, steps: int = 4) -> tuple[float, dict[int, dict[str, float]]]:
    """Largest |loss difference| over `steps` steps between an uninterrupted run and one interrupted half-way
    and resumed from its checkpoint; and the uninterrupted run's logged steps."""
    common = [f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps // 2}"]
    full = train_briefly(cfg, workdir / "resume_full", common)
    train_briefly(cfg, workdir / "resume_cut", common, interrupt_at=steps // 2)
    resumed = train_briefly(cfg, workdir / "resume_cut", common)
    if sorted(resumed) != list(range(steps)):
        return float("inf"), full
    return max(abs(full[s]["train/loss"] - resumed[s]["train/loss"]) for s in range(steps)), full


VACUOUS = "vacuous: every step's loss was 0, so this shows nothing"
VACUOUS_ADVICE = (
    "nothing was trained (for RL: no group had a reward spread); run the doctor on a model that "
    "already solves some prompts, or fix the answer format (stage.answer_extraction=lenient)"
)


def check_resume(cfg: DictConfig, workdir: Path, run: TrainConfig) -> tuple[Finding, Finding]:
    gap, steps = resume_gap(cfg, workdir)
    measured = f"4 steps vs 2 + interrupt + resume + 2: largest loss difference {gap:.1e}"
    vacuous = all(row["train/loss"] == 0 for row in steps.values())
    if gap > 1e-6:
        resume = Finding(
            "resume equivalence", "fail", measured, "a resumed run trains on other batches or another state"
        )
    elif vacuous:
        resume = Finding("resume equivalence", "warn", f"{VACUOUS}; {measured}", VACUOUS_ADVICE)
    else:
        resume = Finding("resume equivalence", "pass", measured)
    # a step: its optimisation (tokens / tokens_per_s) and, for RL, its generation
    seconds = [row["train/step_s"] + row.get("train/generation_s", 0.0) for row in steps.values()]
    per_step = sum(seconds) / len(seconds)
    tokens_per_s = sum(row["train/tokens_per_s"] for row in steps.values()) / len(steps)
    if run.hardware.strategy == "fsdp":
        memory = "peak memory not measured (the ranks ran as their own processes)"
    elif torch.cuda.is_available():
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    else:
        memory = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (process RSS)"
    cost = (
        f"{per_step:.2f} s/step, {tokens_per_s:,.0f} tokens/s, {memory}; "
        f"{run.trainer.max_steps} steps ≈ {per_step * run.trainer.max_steps / 3600:.2f} h at this rate"
    )
    budget = (
        Finding("budget", "warn", f"{VACUOUS}; {cost}", VACUOUS_ADVICE) if vacuous else Finding("budget", "pass", cost)
    )
    return resume, budget


# ---- the doctor ---------------------------------------------------------------------------------------------------
def with_values(cfg: DictConfig, directory: Path, overrides: Sequence[str]) -> DictConfig:
    """A copy of `cfg` with dotted overrides, writing to `directory`, without held-out evaluation or validation."""
    updated = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"output_dir={directory}",
                "heldout.num_prompts=0",
                "trainer.val_every=100000",
                "trainer.log_every=1",
                "model.dtype=float32",
                "ckpt_path=last",
                *overrides,
            ]
        ),
    )
    with open_dict(updated):
        updated.logger = {
            "csv": {
                "_target_": "thinkforge.resume.ContinuingCSVLogger",
                "save_dir": str(directory),
                "name": "csv",
                "version": "",
                "flush_logs_every_n_steps": 1,
            }
        }
    return updated


def read_steps(directory: Path) -> dict[int, dict[str, float]]:
    """step -> every metric logged at that step, for the steps that trained (they log train/loss)."""
    steps: dict[int, dict[str, float]] = {}
    for name, points in read_csv_log(directory).items():
        for step, value in points:
            steps.setdefault(step, {})[name] = value
    return {step: metrics for step, metrics in steps.items() if "train/loss" in metrics}


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
    prompts = [stage.render_prompt(prompt) for prompt, _ in golds]
    trains = not (stand_in and stage.items_need_model)
    checks: list[tuple[str, Callable[[], Finding | tuple[Finding, ...]]]] = [
        ("template and mask", lambda: check_template(probe)),
        ("split: micro-batches", lambda: check_micro_batches(cfg, workdir)),
        ("split: packed vs unpacked", lambda: check_packing(probe, run)),
        ("split: ranks", lambda: check_ranks(cfg, probe, workdir)),
        ("sampler vs trainer log-probs", lambda: check_logprobs(probe, run, prompts)),
        ("grader audit", lambda: check_grader([gold for _, gold in golds])),
        ("resume equivalence", lambda: check_resume(cfg, workdir, run)),
    ]
    findings: list[Finding] = []
    peak_disk = 0
    for name, check in checks:
        if not trains and name in ("split: micro-batches", "split: ranks", "resume equivalence"):
            findings.append(
                Finding(
                    name,
                    "skip",
                    "samples its training data from the previous stage's export",
                    "run thinkforge-doctor on that export once it exists",
                )
            )
            continue
        try:
            result = check()
        except Exception as error:  # one broken check is reported; the others still run
            lines = str(error).strip().splitlines()
            result = Finding(name, "fail", f"{type(error).__name__}: {lines[-1][:200] if lines else ''}")
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


def disk_usage(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) if directory.exists() else 0


def prune_runs(workdir: Path) -> None:
    """Deletes the short runs' checkpoints and exports (a 135M model leaves 2 GB per run); their logs stay."""
    for pattern in ("*/checkpoints", "*/export", "*/rollout_model", "*/hpc_ckpt_*.ckpt"):
        for path in workdir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def format_findings(findings: Sequence[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    lines = [f"{'check':<{width}}  status  measured / what to do"]
    for finding in findings:
        lines.append(f"{finding.check:<{width}}  {finding.status:<6}  {finding.measured}")
        if finding.advice:
            lines.append(f"{'':<{width}}          → {finding.advice}")
    return "\n".join(lines)
