"""Evaluation: held-out scoring during training, and benchmark evaluation (`thinkforge-eval`).

Benchmark metrics follow the usual definitions: pass@1 averaged over the k samples of each problem, the unbiased
pass@k estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), and maj@k, a vote over the first k samples' answers
(normalised strings) whose winner is graded by the verifier.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from thinkforge.config import BudgetForcingConfig, ConfigError, DataConfig, EvalConfig, Grading
from thinkforge.rewards.math import THINK_END, extract_answer, math_accuracy_many, normalize_answer
from thinkforge.rollout.base import Rollout, RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)

# Scores a batch: (completions, golds) -> 1.0/0.0 each.
BatchVerifier = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class HeldOutSums:
    """Sums, so that shards from several ranks add up before dividing."""

    samples: float = 0.0
    correct: float = 0.0
    finished: float = 0.0
    tokens: float = 0.0

    def as_list(self) -> list[float]:
        return [self.samples, self.correct, self.finished, self.tokens]

    def metrics(self) -> dict[str, float]:
        n = max(self.samples, 1.0)
        return {"accuracy": self.correct / n, "eos_rate": self.finished / n, "mean_length": self.tokens / n}


def score_rollouts(
    groups: Sequence[Sequence[Rollout]], golds: Sequence[str], verifier: BatchVerifier = math_accuracy_many
) -> HeldOutSums:
    flat = [(rollout, gold) for rollouts, gold in zip(groups, golds) for rollout in rollouts]
    scores = verifier([rollout.text for rollout, _ in flat], [gold for _, gold in flat])
    return HeldOutSums(
        samples=float(len(flat)),
        correct=float(sum(scores)),
        finished=float(sum(rollout.finished for rollout, _ in flat)),
        tokens=float(sum(len(rollout.token_ids) for rollout, _ in flat)),
    )


# ---- benchmark metrics -----------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"need 0 <= c <= n and 0 < k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    missing_all = 1.0
    for i in range(n - c + 1, n + 1):
        missing_all *= 1.0 - k / i
    return 1.0 - missing_all


def majority_correct(samples: Sequence[dict[str, Any]]) -> bool:
    """Votes over the samples' extracted answers (unanswered samples abstain); ties go to the earliest answer."""
    keys = [normalize_answer(s["answer"]) if s.get("answer") is not None else None for s in samples]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(key for key in keys if key is not None and votes[key] == top)
    return bool(samples[keys.index(winner)]["correct"])


def summarize(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """Benchmark metrics from per-sample rows (`problem`, `correct`, `answer`, optional `num_tokens`/`finished`)."""
    problems: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        problems.setdefault(row["problem"], []).append(row)
    if not problems:
        raise ValueError("no samples to summarize")
    fewest = min(len(samples) for samples in problems.values())
    summary: dict[str, float] = {"problems": float(len(problems)), "samples": float(len(rows))}
    summary["pass@1"] = sum(sum(s["correct"] for s in p) / len(p) for p in problems.values()) / len(problems)
    too_many = sorted(k for k in set(ks) if k > fewest)
    if too_many:
        raise ConfigError(f"ks: pass@k and maj@k need k samples of every problem; some problem has only {fewest}, "
                          f"so {too_many} cannot be computed (set ks=[...] to values <= {fewest})")
    for k in sorted(set(ks)):
        summary[f"pass@{k}"] = sum(pass_at_k(len(p), sum(bool(s["correct"]) for s in p), k) for p in problems.values()) / len(problems)
        summary[f"maj@{k}"] = sum(majority_correct(p[:k]) for p in problems.values()) / len(problems)
    if all("num_tokens" in row for row in rows):
        summary["mean_length"] = sum(row["num_tokens"] for row in rows) / len(rows)
    if all("finished" in row for row in rows):
        summary["eos_rate"] = sum(bool(row["finished"]) for row in rows) / len(rows)
    return summary


# ---- generation with s1 budget forcing ---------------------------------------------------------------------
@dataclass
class Completion:
    text: str = ""
    num_tokens: int = 0
    # Ended with EOS (not truncated).
    finished: bool = False
    waits: int = 0
    thinking_done: bool = False


def _advance_thinking(state: Completion, rollout: Rollout, budget: BudgetForcingConfig, cap: int) -> None:
    state.num_tokens += len(rollout.token_ids)
    if rollout.stopped_by == THINK_END and state.waits < budget.num_waits and state.num_tokens < cap:
        state.text += rollout.text.removesuffix(THINK_END) + budget.wait_text
        state.waits += 1
        return
    state.text += rollout.text
    if rollout.finished:
        state.finished = state.thinking_done = True
    elif rollout.stopped_by == THINK_END:
        state.thinking_done = True
    else:  # the thinking budget is spent
        state.text += f"\n{THINK_END}\n"
        state.thinking_done = True


def generate_with_budget(
    engine: RolloutEngine, prompts: Sequence[str], sampling: SamplingConfig, budget: BudgetForcingConfig, *, seed: int
) -> list[Completion]:
    """One completion per prompt. Thinking runs until `</think>`; while waits remain, that `</think>` is replaced by
    "Wait" and thinking goes on; at `max_thinking_tokens` the thinking is closed by force. Then the answer."""
    cap = budget.max_thinking_tokens or sampling.max_new_tokens
    states = [Completion() for _ in prompts]
    rounds = 0
    while active := [i for i, state in enumerate(states) if not state.thinking_done]:
        by_budget_left: dict[int, list[int]] = {}
        for i in active:
            by_budget_left.setdefault(cap - states[i].num_tokens, []).append(i)
        for left, members in by_budget_left.items():
            step = replace(sampling, num_samples=1, max_new_tokens=left, stop_strings=(THINK_END,))
            outputs = engine.generate([prompts[i] + states[i].text for i in members], step, seed=seed + rounds)
            rounds += 1
            for i, [rollout] in zip(members, outputs):
                _advance_thinking(states[i], rollout, budget, cap)
    answering = [i for i, state in enumerate(states) if not state.finished]
    answer_sampling = replace(sampling, num_samples=1, max_new_tokens=budget.max_answer_tokens, stop_strings=())
    for i, [rollout] in zip(answering, engine.generate([prompts[i] + states[i].text for i in answering], answer_sampling, seed=seed + rounds)):
        states[i].text += rollout.text
        states[i].num_tokens += len(rollout.token_ids)
        states[i].finished = rollout.finished
    return states


# ---- thinkforge-eval ---------------------------------------------------------------------------------------------
def load_benchmark(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(problem texts, gold answers), with the benchmark's field mapping and answer marker applied."""
    from thinkforge.data.records import load_records

    bench = cfg.benchmark
    data = DataConfig(train=bench.path, val=None, fields={**DataConfig().fields, **bench.fields}, synthetic=bench.synthetic)
    rows = load_records(bench.path, bench.split, data, required=("prompt", "answer")).rows[: bench.limit]
    golds = [row["answer"] for row in rows]
    if bench.answer_after:
        golds = [gold.rsplit(bench.answer_after, 1)[-1].strip() for gold in golds]
    return [row["prompt"] for row in rows], golds


def sample_benchmark(cfg: EvalConfig) -> list[dict[str, Any]]:
    import torch

    from thinkforge.backbone import load_hf_model, load_tokenizer
    from thinkforge.rollout.hf import HFEngine

    problems, golds = load_benchmark(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_hf_model(cfg.model, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
    engine = HFEngine(model, tokenizer, batch_size=cfg.batch_size)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    prompts = [
        tokenizer.apply_chat_template([*system, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    sampling = SamplingConfig(cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    if cfg.budget.enabled:
        jobs = [(p, s) for p in range(len(prompts)) for s in range(cfg.num_samples)]
        flat = generate_with_budget(engine, [prompts[p] for p, _ in jobs], sampling, cfg.budget, seed=cfg.seed)
        completions = [[c for (p, _), c in zip(jobs, flat) if p == problem] for problem in range(len(prompts))]
    else:
        groups = engine.generate(prompts, sampling, seed=cfg.seed)
        completions = [[Completion(r.text, len(r.token_ids), r.finished) for r in group] for group in groups]
    return [
        {"benchmark": cfg.benchmark.name, "problem": p, "sample": s, "prompt": problems[p], "gold": golds[p], "completion": c.text,
         "num_tokens": c.num_tokens, "finished": c.finished, "waits": c.waits}
        for p, group in enumerate(completions) for s, c in enumerate(group)
    ]


def benchmark_of(samples_file: str | None, default: str) -> str:
    """The benchmark a samples file was drawn from (its rows say so), so that re-grading it writes under
    logs/eval/<that benchmark>/ instead of under the default benchmark's name. Used by conf/eval.yaml's run dir."""
    if samples_file is None or not Path(samples_file).is_file():
        return default
    with open(samples_file) as handle:
        first = handle.readline()
    try:
        return str(json.loads(first).get("benchmark") or default)
    except (json.JSONDecodeError, AttributeError):
        return default  # read_samples reports the bad row


def read_samples(path: str) -> list[dict[str, Any]]:
    """Per-sample rows to grade: `problem`, `gold` and `completion` are required; errors name the row and field."""
    from thinkforge.data.records import DataError

    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {number}: invalid JSON: {error.msg}") from None
            for name in ("problem", "gold", "completion"):
                if name not in row:
                    raise DataError(f"{path}: row {number}: field '{name}' is missing")
            rows.append(row)
    return rows


def grade(rows: list[dict[str, Any]], grading: Grading = Grading.strict) -> None:
    lenient = grading is Grading.lenient
    scores = math_accuracy_many([row["completion"] for row in rows], [str(row["gold"]) for row in rows], lenient=lenient)
    for row, score in zip(rows, scores):
        row["answer"] = extract_answer(row["completion"], lenient)
        row["correct"] = bool(score)


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    rows = read_samples(cfg.samples_file) if cfg.samples_file else sample_benchmark(cfg)
    grade(rows, cfg.grading)
    summary = summarize(rows, cfg.ks)
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with (output / "samples.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    name = benchmark_of(cfg.samples_file, cfg.benchmark.name)
    (output / "summary.json").write_text(json.dumps({"benchmark": name, **summary}, indent=2))
    header = " | ".join(summary)
    values = " | ".join(f"{v:.1%}" if "@" in k or k == "eos_rate" else f"{v:.4g}" for k, v in summary.items())
    print(f"[eval] {name}\n| {header} |\n|{'---|' * len(summary)}\n| {values} |\n[eval] per-sample results: {output / 'samples.jsonl'}")
    return summary
