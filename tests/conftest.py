"""Shared helpers: compose the real Hydra configs, run stages in-process or through the console script."""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from thinkforge.cli import config_dir  # importing the CLI registers the schemas Hydra composes with

TESTS_DIR = Path(__file__).parent
BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

# Small enough to train in seconds on two CPU cores, big enough to exercise packing, accumulation and sharding.
FAST = [
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=32",
    "data.max_sequence_length=256",
    "data.batch_size=8",
    "data.micro_batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_every=2",
    "trainer.ckpt_every=2",
    "optim.warmup_steps=1",
    # held-out scoring at the end of each run samples as by default, for fewer tokens (a random model never stops)
    "heldout.sampling.max_new_tokens=32",
]


#: a Qwen2 small enough for exact layout and engine comparisons in a second (built from config, random weights)
TINY_QWEN = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


#: GRPO on a reward a random model earns now and then (`leading_space`): learnable in tens of steps
LEARNABLE_GRPO = [
    "stage=grpo",
    "data.synthetic.num_train=64",
    "data.batch_size=8",
    "data.micro_batch_size=8",
    "stage.sampling.num_samples=8",
    "stage.sampling.max_new_tokens=4",
    "stage.dynamic_sampling=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
    "optim.min_lr_ratio=1.0",
    "optim.weight_decay=0.0",
    "heldout.num_prompts=0",
]


#: calls that train, sample or evaluate through a whole stage: a test making one is an end-to-end test
END_TO_END_CALLS = ("run_stage(", "run_cli(", "run_pipeline(", ".fit(", "run_doctor(", "resume_gap(", "first_step(")
#: fixtures that train a model before the test starts
TRAINED_FIXTURES = {"coin", "midtrain_run", "smollm2", "tool_sft", "word_problems"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `e2e` every test that trains end to end (by the calls it makes or the fixtures it uses), so that
    `pytest -m "not slow and not e2e"` is the unit tests a developer runs in a loop."""
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if any(call in source for call in END_TO_END_CALLS) or TRAINED_FIXTURES & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.e2e)


def leading_space(sample) -> float:
    """1 when the completion starts with a space: about a fifth of a random model's first tokens do."""
    return float(sample.completion.startswith(" "))


def space_share(sample) -> float:
    """About the share of the completion's tokens that start with a space (a byte-level BPE puts a word's space
    at its token's start): every token counts, not only the first."""
    return min(1.0, sample.completion.count(" ") / max(sample.num_tokens, 1))


def compose_config(*overrides: str, output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        extra = [f"output_dir={output_dir}"] if output_dir is not None else ["output_dir=unused"]
        return compose("train", overrides=[*overrides, *extra])


def run_cli_command(program: str) -> list[str]:
    executable = Path(sys.executable).with_name(program)
    return [str(executable) if executable.exists() else program]


def run_cli(
    *args: str, cwd: Path, program: str = "thinkforge-train", timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [*run_cli_command(program), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def logged(run_dir: Path, name: str) -> dict[int, float]:
    """step -> value of one metric from a run's CSV log."""
    return {int(row["step"]): float(row[name]) for row in read_metrics(run_dir) if row.get(name)}


@pytest.fixture(scope="session")
def tokenizer():
    from thinkforge.tokenizer import build_synthetic_tokenizer

    return build_synthetic_tokenizer()


@pytest.fixture(scope="session")
def chat(tokenizer):
    """The default run's chat format: the built-in tokenizer, no system prompt."""
    from thinkforge.chat import ChatFormat

    return ChatFormat(tokenizer)


COIN_PROMPTS = 16


@pytest.fixture(scope="session")
def coin(tmp_path_factory):
    """A tiny model that answers \\boxed{1} or \\boxed{2} about equally often, and prompts whose gold answer is one
    of the two: sampling finds a correct and an incorrect reply for most prompts."""
    from thinkforge.training import run_stage

    root = tmp_path_factory.mktemp("coin")
    sft, prompts = root / "sft.jsonl", root / "prompts.jsonl"
    flips = [{"prompt": "Flip a coin.", "completion": f"<think>\n</think>\n\\boxed{{{1 + i % 2}}}"} for i in range(64)]
    sft.write_text("".join(json.dumps(row) + "\n" for row in flips))
    golds = [{"prompt": "Flip a coin.", "answer": str(1 + i % 2)} for i in range(COIN_PROMPTS)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in golds))
    result = run_stage(
        compose_config(
            *FAST,
            "stage=sft",
            "data=jsonl",
            f"data.train={sft}",
            "data.val=null",
            "heldout.num_prompts=0",
            "trainer.max_steps=30",
            "optim.lr=3e-3",
            output_dir=root / "sft",
        )
    )
    return result.export_dir, prompts
