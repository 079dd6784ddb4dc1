"""What `thinkforge-eval` scores and how: the benchmarks (the shared ones registered here by name, beside the
synthetic ones in conf/benchmark/), s1 budget forcing, grading, and the evaluation's own settings. Free of torch,
like every schema, so that composing a config stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from thinkforge.config import CANONICAL_FIELDS, ModelConfig, SyntheticConfig
from thinkforge.errors import require
from thinkforge.rollout.settings import RolloutConfig, SamplingConfig, ToolsConfig


@dataclass
class BenchmarkConfig:
    # Names its results' directory, logs/eval/<name>
    name: str = MISSING
    # A .jsonl/.parquet file (or a `datasets` hub name) with a problem and a gold answer per row.
    path: str = MISSING
    # The split of a hub dataset, or of the synthetic task (test)
    split: str = "test"
    # Canonical field -> column, e.g. {prompt: problem, answer: answer}.
    fields: dict[str, str] = field(default_factory=lambda: {"prompt": "prompt", "answer": "answer"})
    # With path=synthetic: the task's settings, e.g. those a pipeline trained on (benchmark=demo).
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Gold answers that end a worked solution (GSM8K's "... #### 42"): keep the text after the last marker.
    answer_after: Optional[str] = None
    # Evaluate the first `limit` problems only.
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(CANONICAL_FIELDS))
        require(
            not unknown, "benchmark.fields", f"unknown canonical fields {unknown}; known: {', '.join(CANONICAL_FIELDS)}"
        )
        require(self.limit is None or self.limit > 0, "benchmark.limit", "must be positive")


def shared_benchmarks() -> dict[str, BenchmarkConfig]:
    """The evaluation sets read from `benchmarks_dir` (`$THINKFORGE_BENCHMARKS`, default ../shared/data/benchmarks):
    defined here, not as files in conf/, so the project holds nothing named after a benchmark's data."""
    problem = {"prompt": "problem", "answer": "answer"}
    return {
        # AIME 2024 (I and II), 30 problems; report pass@1 over 16+ samples.
        "aime24": BenchmarkConfig("aime24", "${benchmarks_dir}/aime24.jsonl", fields=problem),
        # AMC 12 2023, 40 problems; answers are floats (27.0) that still match 27.
        "amc23": BenchmarkConfig("amc23", "${benchmarks_dir}/amc23.jsonl", fields=problem),
        # MATH-500; never train on it.
        "math500": BenchmarkConfig("math500", "${benchmarks_dir}/math500.jsonl", fields=problem),
        # GSM8K test: the gold answer is the number after "####" at the end of the worked solution.
        "gsm8k": BenchmarkConfig(
            "gsm8k",
            "${benchmarks_dir}/gsm8k_test.jsonl",
            fields={"prompt": "question", "answer": "answer"},
            answer_after="####",
        ),
    }


@dataclass
class BudgetForcingConfig:
    """s1 budget forcing: cap the thinking (force `</think>`), or extend it by replacing `</think>` with "Wait"."""

    # The thinking is closed with </think> at this many tokens (null: no cap)
    max_thinking_tokens: Optional[int] = None
    # An early </think> is replaced with wait_text this many times, so the model thinks longer
    num_waits: int = 0
    # What replaces an early </think>
    wait_text: str = "Wait"
    # Tokens for the final answer after the thinking ends.
    max_answer_tokens: int = 256

    @property
    def enabled(self) -> bool:
        return self.max_thinking_tokens is not None or self.num_waits > 0

    def __post_init__(self) -> None:
        require(
            self.max_thinking_tokens is None or self.max_thinking_tokens > 0,
            "budget.max_thinking_tokens",
            "must be positive",
        )
        require(
            self.num_waits >= 0 and self.max_answer_tokens > 0, "budget", "num_waits >= 0 and max_answer_tokens > 0"
        )


class Grading(str, Enum):
    """strict: the RL reward's rule (a `\\boxed{}` after `</think>`). lenient: for instruct models that state
    their answer in words or a last formula; never used for rewards."""

    strict = "strict"
    lenient = "lenient"


def deepscaler_protocol() -> SamplingConfig:
    return SamplingConfig(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=1024)


@dataclass
class EvalConfig:
    # Required unless grading a samples_file: e.g. model=pretrained model.name_or_path=<an export>.
    model: Optional[ModelConfig] = None
    benchmark: BenchmarkConfig = MISSING
    # num_samples per problem: pass@1 is averaged over them; pass@k (unbiased) and maj@k use them too.
    # DeepScaleR's protocol is 16 samples at temperature 0.6, top-p 0.95; 4 here so the default runs on CPU
    sampling: SamplingConfig = field(default_factory=deepscaler_protocol)
    # The k of pass@k and maj@k, each at most sampling.num_samples
    ks: list[int] = field(default_factory=lambda: [1, 4])
    budget: BudgetForcingConfig = field(default_factory=BudgetForcingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # tools=python: the model may call the Python tool while it answers, as it did in training
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    # A system turn put first in every prompt
    system_prompt: Optional[str] = None
    # The sampling seed
    seed: int = 0
    # Grade an existing per-sample file (problem, gold, completion per row) instead of generating.
    samples_file: Optional[str] = None
    # strict: a \boxed{} after </think>, as the RL reward; lenient: also a stated answer, a last formula or number
    grading: Grading = Grading.strict
    # Where the shared benchmarks' .jsonl files are ($THINKFORGE_BENCHMARKS, else ../shared/data/benchmarks)
    benchmarks_dir: str = "../shared/data/benchmarks"
    # The run directory, logs/eval/<benchmark>/runs/<time>
    output_dir: str = MISSING
    # Compose and validate, print the config, and stop
    dry_run: bool = False

    def __post_init__(self) -> None:
        self.sampling.check("sampling")
        require(self.sampling.max_new_tokens is not None, "sampling.max_new_tokens", "is required")
        require(all(k > 0 for k in self.ks), "ks", "must be positive")
        require(
            not (self.tools.enabled and self.budget.enabled),
            "budget",
            "budget forcing appends to one-turn replies; it does not take tools (set tools=none)",
        )
        require(
            self.samples_file is not None or self.model is not None,
            "model",
            "pick the model to evaluate, e.g. model=pretrained model.name_or_path=logs/pipeline/demo-seed0/grpo/export",
        )
        require(
            self.samples_file is not None or all(k <= self.sampling.num_samples for k in self.ks),
            "ks",
            f"every k must be <= sampling.num_samples ({self.sampling.num_samples}); got {self.ks}",
        )
