"""Resume equivalence and the budget: a run interrupted half-way and resumed logs the losses of an uninterrupted
one, and the uninterrupted one's steps say what the whole run will cost."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from omegaconf import DictConfig

from thinkforge.config import TrainConfig
from thinkforge.doctor.findings import Finding
from thinkforge.doctor.runs import Steps, train_briefly

VACUOUS = "vacuous: every step's loss was 0, so this shows nothing"
VACUOUS_ADVICE = (
    "nothing was trained (for RL: no group had a reward spread); run the doctor on a model that "
    "already solves some prompts, or fix the answer format (stage.answer_extraction=lenient)"
)


def resume_gap(cfg: DictConfig, workdir: Path, steps: int = 4) -> tuple[float, Steps]:
    """Largest |loss difference| over `steps` steps between an uninterrupted run and one interrupted half-way
    and resumed from its checkpoint; and the uninterrupted run's logged steps."""
    common = [f"trainer.max_steps={steps}", f"trainer.ckpt_every={steps // 2}"]
    full = train_briefly(cfg, workdir / "resume_full", common)
    train_briefly(cfg, workdir / "resume_cut", common, interrupt_at=steps // 2)
    resumed = train_briefly(cfg, workdir / "resume_cut", common)
    if sorted(resumed) != list(range(steps)):
        return float("inf"), full
    return max(abs(full[s]["train/loss"] - resumed[s]["train/loss"]) for s in range(steps)), full


def peak_memory(run: TrainConfig) -> str:
    if run.hardware.strategy == "fsdp":
        return "peak memory not measured (the ranks ran as their own processes)"
    if torch.cuda.is_available():
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (process RSS)"


def check_resume(cfg: DictConfig, run: TrainConfig, workdir: Path) -> tuple[Finding, Finding]:
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
    cost = (
        f"{per_step:.2f} s/step, {tokens_per_s:,.0f} tokens/s, {peak_memory(run)}; "
        f"{run.trainer.max_steps} steps ≈ {per_step * run.trainer.max_steps / 3600:.2f} h at this rate"
    )
    budget = (
        Finding("budget", "warn", f"{VACUOUS}; {cost}", VACUOUS_ADVICE) if vacuous else Finding("budget", "pass", cost)
    )
    return resume, budget
