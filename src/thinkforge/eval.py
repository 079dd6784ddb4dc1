"""`thinkforge-eval`: sample a benchmark (with s1 budget forcing), grade, and report `thinkforge.metrics`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from thinkforge.benchmarks import BudgetForcingConfig, EvalConfig, Grading
from thinkforge.chat import ChatFormat
from thinkforge.config import DataConfig
from thinkforge.errors import ConfigError
from thinkforge.metrics import summarize
from thinkforge.progress import GenerationProgress
from thinkforge.rewards.code import CodeTests, extract_code
from thinkforge.rewards.grading import Gold, gold_json, grade_many
from thinkforge.rewards.math import THINK_END, extract_answer
from thinkforge.rollout.base import Rollout, RolloutEngine
from thinkforge.rollout.settings import SamplingParams
from thinkforge.rollout.tools import ToolRollouts

log = logging.getLogger(__name__)


# ---- generation with s1 budget forcing ---------------------------------------------------------------------
@dataclass
class Completion:
    text: str = ""
    num_tokens: int = 0
    # Ended with EOS (not truncated).
    finished: bool = False
    waits: int = 0
    thinking_done: bool = False
    # with tools: the calls made, and the reply with the tool's results in place
    tool_calls: int = 0
    transcript: str = ""


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
    engine: RolloutEngine, prompts: Sequence[str], sampling: SamplingParams, budget: BudgetForcingConfig, *, seed: int
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
    for i, [rollout] in zip(
        answering,
        engine.generate([prompts[i] + states[i].text for i in answering], answer_sampling, seed=seed + rounds),
    ):
        states[i].text += rollout.text
        states[i].num_tokens += len(rollout.token_ids)
        states[i].finished = rollout.finished
    return states


# ---- thinkforge-eval ---------------------------------------------------------------------------------------------
def load_benchmark(cfg: EvalConfig) -> tuple[list[str], list[Gold]]:
    """(problem texts, golds: answers, or a coding problem's tests), with the benchmark's field mapping and answer
    marker applied."""
    from thinkforge.data.records import GOLD, load_records

    bench = cfg.benchmark
    data = DataConfig(
        train=bench.path, val=None, fields={**DataConfig().fields, **bench.fields}, synthetic=bench.synthetic
    )
    rows = load_records(bench.path, bench.split, data, required=("prompt", GOLD)).rows[: bench.limit]
    golds: list[Gold] = [row[GOLD] for row in rows]
    if bench.answer_after:
        golds = [gold.rsplit(bench.answer_after, 1)[-1].strip() if isinstance(gold, str) else gold for gold in golds]
    return [row["prompt"] for row in rows], golds


def build_engine(cfg: EvalConfig, chat: ChatFormat, prompts: Sequence[str]) -> RolloutEngine:
    """The configured engine (`rollout.engine`) on the model to evaluate, serving the longest prompt plus its
    completion (and, with budget forcing, the answer after it)."""
    from thinkforge.backbone import load_for_generation
    from thinkforge.rollout.engines import EngineSource, build_engine

    assert cfg.model is not None  # EvalConfig requires one unless re-grading a samples file
    model = cfg.model

    def weights_dir() -> str:
        if model.name_or_path is None:
            raise ConfigError("rollout.engine: vllm loads its weights from model.name_or_path, which is not set")
        return model.name_or_path

    longest = max(len(ids) for ids in chat.encode_many(prompts))
    answer = cfg.budget.max_answer_tokens + 8 if cfg.budget.enabled else 0
    source = EngineSource(
        chat,
        model=lambda: load_for_generation(model, chat),
        weights_dir=weights_dir,
        max_model_len=longest + cfg.sampling.at().max_new_tokens + answer,
        seed=cfg.seed,
    )
    return build_engine(cfg.rollout, source)


def sample_benchmark(cfg: EvalConfig) -> list[dict[str, Any]]:
    assert cfg.model is not None
    problems, golds = load_benchmark(cfg)
    chat = ChatFormat.for_model(cfg.model, cfg.system_prompt, tools=cfg.tools.enabled)
    prompts = [chat.prompt(problem) for problem in problems]
    sampling = cfg.sampling.at()
    engine = build_engine(cfg, chat, prompts)
    generate = ToolRollouts(engine.generate, chat, cfg.tools) if cfg.tools.enabled else engine.generate
    if cfg.budget.enabled:
        jobs = [(p, s) for p in range(len(prompts)) for s in range(sampling.num_samples)]
        flat = generate_with_budget(engine, [prompts[p] for p, _ in jobs], sampling, cfg.budget, seed=cfg.seed)
        completions = [[c for (p, _), c in zip(jobs, flat) if p == problem] for problem in range(len(prompts))]
    else:
        progress = GenerationProgress(len(prompts) * sampling.num_samples, f"{cfg.benchmark.name}: samples")
        try:
            groups = generate(prompts, sampling, seed=cfg.seed, progress=progress)
        finally:
            progress.close()
        completions = [
            [
                Completion(r.text, len(r.token_ids), r.finished, tool_calls=len(r.calls), transcript=r.transcript)
                for r in group
            ]
            for group in groups
        ]
    return [
        {
            "benchmark": cfg.benchmark.name,
            "problem": p,
            "sample": s,
            "prompt": problems[p],
            "rendered_prompt": prompts[p],
            "gold": gold_json(golds[p]),
            "completion": c.text,
            "num_tokens": c.num_tokens,
            "finished": c.finished,
            "waits": c.waits,
            **({"tool_calls": c.tool_calls, "transcript": c.transcript} if cfg.tools.enabled else {}),
        }
        for p, group in enumerate(completions)
        for s, c in enumerate(group)
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
    """Per-sample rows to grade: `problem`, `gold` (an answer, or a coding problem's list of tests) and
    `completion` are required; errors name the row and field."""
    from thinkforge.data.records import DataError, read_objects

    rows = []
    for number, row in read_objects(path):
        for name in ("problem", "gold", "completion"):
            if name not in row:
                raise DataError(f"{path}: row {number}: field '{name}' is missing")
        if isinstance(row["gold"], list):
            try:
                CodeTests.parse(row["gold"])
            except TypeError as error:
                raise DataError(f"{path}: row {number}: field 'gold': {error}") from None
        rows.append(dict(row))
    return rows


def grade(rows: list[dict[str, Any]], grading: Grading = Grading.strict) -> None:
    """Each row's `correct`, and its `answer`: the extracted answer, or the code a coding row's tests ran (maj@k
    votes over these)."""
    lenient = grading is Grading.lenient
    golds = [CodeTests.parse(row["gold"]) if isinstance(row["gold"], list) else str(row["gold"]) for row in rows]
    grades = grade_many([row["completion"] for row in rows], golds, lenient=lenient)
    for row, gold, verdict in zip(rows, golds, grades):
        code = isinstance(gold, CodeTests)
        row["answer"] = extract_code(row["completion"], lenient) if code else extract_answer(row["completion"], lenient)
        row["correct"] = verdict.correct


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
    print(
        f"[eval] {name}\n| {header} |\n|{'---|' * len(summary)}\n| {values} |\n"
        f"[eval] per-sample results: {output / 'samples.jsonl'}"
    )
    return summary
