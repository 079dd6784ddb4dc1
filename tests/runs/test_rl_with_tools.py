"""Multi-turn GRPO with the Python tool on the tiny model: SFT on tool-using traces teaches the call; its rollouts
are scored by the trainer exactly as the engine sampled them, across turns; GRPO teaches a model that mostly
answers at once (and wrong) to call the tool, on seeds 0-2, and fails to with the advantage's sign flipped; a
killed run resumes to the same losses; greedy turns through vLLM are the HF engine's tokens. About eight minutes on
2 CPU cores: `slow`, run by CI's second step."""

from __future__ import annotations

import json
from statistics import mean

import pytest
import torch
from conftest import compose_config, logged, read_metrics, run_cli

from thinkforge import doctor
from thinkforge.backbone import CausalLM, load_for_generation
from thinkforge.chat import ChatFormat
from thinkforge.config import ModelConfig
from thinkforge.data.packing import IGNORE_INDEX
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams, ToolsConfig
from thinkforge.rollout.tools import ToolRollouts
from thinkforge.stages import grpo
from thinkforge.stages.completions import CompletionBatcher, completion_scores
from thinkforge.training import run_stage

pytestmark = pytest.mark.slow

#: products of two three-digit numbers: the tool task at the tiny model's scale
TOOL_TASK = ["data.synthetic.task=tool", "data.synthetic.min_level=2", "data.synthetic.max_level=2"]
TOOL_SFT = [
    *TOOL_TASK,
    "stage=sft",
    "stage.format=messages",
    "tools=python",
    "data.synthetic.num_train=2048",
    "data.synthetic.num_val=64",
    "data.max_sequence_length=96",
    "data.batch_size=32",
    "data.micro_batch_size=32",
    "trainer.val_every=1000",
    "trainer.ckpt_every=1000",
    "heldout.num_prompts=64",
    "heldout.sampling.max_new_tokens=80",
    "logger=csv",
]


@pytest.fixture(scope="module")
def tool_sft(tmp_path_factory):
    """The tiny model after SFT on tool-using traces: it writes the call, and boxes what the tool printed."""
    root = tmp_path_factory.mktemp("tool_sft")
    steps = ["optim.lr=1e-3", "optim.warmup_steps=10", "trainer.max_steps=200"]  # the recipe's tool_sft
    result = run_cli(*TOOL_SFT, *steps, f"hydra.run.dir={root}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def tool_habits(tool_sft, tmp_path_factory):
    """The tool-using model after 30 steps on traces 80% of which answer at once: it keeps both habits, and now
    mostly blurts (wrong: it cannot multiply in its head), while the call it still makes now and then is right."""
    root = tmp_path_factory.mktemp("tool_habits")
    habits = ["data.synthetic.answer_only_fraction=0.8", "data.synthetic.seed=1", "optim.lr=1e-3"]
    start = ["model=pretrained", f"model.name_or_path={tool_sft / 'export'}", "optim.warmup_steps=0"]
    result = run_cli(*TOOL_SFT, *habits, *start, "trainer.max_steps=30", f"hydra.run.dir={root}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_sft_on_tool_traces_teaches_the_call(tool_sft, tool_habits):
    assert json.loads((tool_sft / "heldout.json").read_text())["accuracy"] >= 0.9, "measured 1.0"
    assert json.loads((tool_habits / "heldout.json").read_text())["accuracy"] <= 0.1, "measured 0.0"


def test_the_trainer_scores_every_turn_as_the_engine_sampled_it(tool_sft):
    export = tool_sft / "export"
    source = ModelConfig(name_or_path=str(export))
    chat = ChatFormat.for_model(source, tools=True)
    model = CausalLM(load_for_generation(source, chat))
    tools = ToolRollouts(HFEngine(model, chat).generate, chat, ToolsConfig(tool="python"))
    problems = [f"What is {a} * {b}?" for a, b in [(347, 829), (512, 604), (731, 288), (905, 117)]]
    prompts = [chat.prompt(problem) for problem in problems]
    sampling = SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=64)
    groups = tools(prompts, sampling, seed=0)
    rollouts = [rollout for group in groups for rollout in group]
    again = [rollout for group in tools(prompts, sampling, seed=0) for rollout in group]
    assert [(r.token_ids, r.inserted, r.logprobs, r.turns) for r in rollouts] == [
        (r.token_ids, r.inserted, r.logprobs, r.turns) for r in again
    ], "the same seed samples the same turns, and the tool gives the same results"
    assert sum(len(rollout.calls) for rollout in rollouts) >= len(rollouts) // 2, "the model calls the tool"
    batcher = CompletionBatcher.for_attention(chat.pad_id, "sdpa", pack=True)
    documents = []
    for index, group in enumerate(groups):
        completions = [(index * 4 + k, r.token_ids, r.trainable) for k, r in enumerate(group)]
        documents += batcher.layout(chat.encode(prompts[index]), completions, share_prompt=True)
    batch = batcher.collate(documents, max(len(document) for document in documents))
    with torch.no_grad():
        logps, _ = completion_scores(model, batch)
    mask = batch["targets"] != IGNORE_INDEX
    gaps = []
    for row, member in enumerate(batch["members"].tolist()):
        rollout = rollouts[member]
        assert mask[row, : len(rollout.token_ids)].tolist() == list(rollout.trainable), "tool tokens carry no loss"
        gap = (torch.tensor(rollout.logprobs) - logps[row, : len(rollout.token_ids)]).abs()
        gaps.append(gap[torch.tensor(rollout.trainable)])
    every = torch.cat(gaps)
    # every model token within 1e-5 (the recipe's tool_sft model, sampling seeds 0-3: the largest 1.9e-6, the mean
    # 2.6e-7, as train/rollout_logprob_diff logs it; fp32 rounding of cached decoding against one pass)
    assert every.max() <= 1e-5, (every.mean(), every.max())
    # the doctor's check samples these same rollouts (seed 0) and scores each unpacked: the same bound
    assert doctor.sampler_trainer_gap(model, chat, prompts, sampling, tools=ToolsConfig(tool="python")) <= 1e-5


def test_greedy_turns_are_the_same_tokens_through_vllm_and_its_server(tool_sft):
    """Every engine, the same greedy tokens over every turn, the tool's turns inserted alike; sampled, the server's
    are the colocated vLLM engine's (seeded per prompt)."""
    pytest.importorskip("vllm")
    from thinkforge.rollout.settings import VLLMEngineConfig, VLLMServerConfig
    from thinkforge.rollout.vllm import VLLMEngine
    from thinkforge.rollout.vllm_server import VLLMServerEngine

    export = tool_sft / "export"
    source = ModelConfig(name_or_path=str(export))
    chat = ChatFormat.for_model(source, tools=True)
    settings = ToolsConfig(tool="python")
    hf = ToolRollouts(HFEngine(CausalLM(load_for_generation(source, chat)), chat).generate, chat, settings)
    engine = VLLMEngine(export, chat, VLLMEngineConfig(), max_model_len=256, seed=0)
    vllm = ToolRollouts(engine.generate, chat, settings)
    server_engine = VLLMServerEngine(export, chat, VLLMServerConfig(cpus="1"), max_model_len=256, seed=0)
    server = ToolRollouts(server_engine.generate, chat, settings)
    prompts = [chat.prompt(f"What is {a} * {b}?") for a, b in [(347, 829), (512, 604), (731, 488)]]
    greedy = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=80)
    sampled = SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=80)
    try:
        ours, theirs, served = (rollouts(prompts, greedy, seed=0) for rollouts in (hf, vllm, server))
        assert [(r.token_ids, r.inserted) for (r,) in ours] == [(r.token_ids, r.inserted) for (r,) in theirs]
        assert [(r.token_ids, r.inserted) for (r,) in served] == [(r.token_ids, r.inserted) for (r,) in theirs]
        assert all(r.calls for (r,) in ours)
        local, remote = vllm(prompts, sampled, seed=3), server(prompts, sampled, seed=3)
        assert [[(r.token_ids, r.inserted) for r in group] for group in local] == [
            [(r.token_ids, r.inserted) for r in group] for group in remote
        ]
    finally:
        server_engine.close()


GRPO_TOOLS = [
    *TOOL_TASK,
    "stage=grpo",
    "tools=python",
    "data.synthetic.num_train=256",
    "data.synthetic.num_val=16",
    "data.batch_size=4",
    "data.micro_batch_size=2",
    "stage.sampling.num_samples=4",
    "stage.sampling.max_new_tokens=64",
    "stage.beta=0.04",
    "optim.lr=1e-4",
    "optim.warmup_steps=0",
    "trainer.max_steps=4",
    "trainer.ckpt_every=1",
    "heldout.num_prompts=8",
    "logger=csv",
]


def test_grpo_with_the_tool_logs_its_calls_and_resumes_to_the_same_losses(tool_sft, tmp_path):
    start = ["model=pretrained", f"model.name_or_path={tool_sft / 'export'}"]
    full = run_cli(*GRPO_TOOLS, *start, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    calls = logged(tmp_path / "full", "train/tools/calls_per_sample")
    assert calls and all(value > 0 for value in calls.values())
    for name in ("train/tools/clean_call_rate", "train/tools/turns_per_sample", "train/tools/time_share"):
        assert logged(tmp_path / "full", name), name
    kill = ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=2"]
    killed = run_cli(*GRPO_TOOLS, *start, *kill, f"hydra.run.dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli(*GRPO_TOOLS, *start, f"hydra.run.dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [int(row["step"]) for row in read_metrics(tmp_path / "killed") if row.get("train/loss")]
    assert steps == [0, 1, 2, 3]
    expected, got = logged(tmp_path / "full", "train/loss"), logged(tmp_path / "killed", "train/loss")
    assert got == pytest.approx(expected, abs=1e-6)


LEARN_WITH_THE_TOOL = [
    *TOOL_TASK,
    "stage=grpo",
    "tools=python",
    "data.synthetic.num_train=512",
    "data.batch_size=8",
    "data.micro_batch_size=8",
    "stage.sampling.num_samples=8",
    "stage.sampling.max_new_tokens=80",
    "stage.dynamic_sampling=false",
    # the recipe's: at 2e-4 one seed's first full-size steps broke the text after the tool's turn
    "optim.lr=1e-4",
    "optim.warmup_steps=5",
    "optim.min_lr_ratio=1.0",
    "optim.weight_decay=0.0",
    "trainer.ckpt_every=1000",
    "heldout.num_prompts=0",
]


def _rewards(tool_habits, output_dir, steps: int, seed: int, *overrides: str) -> tuple[list[float], list[float]]:
    cfg = compose_config(
        *LEARN_WITH_THE_TOOL, "model=pretrained", f"model.name_or_path={tool_habits / 'export'}",
        f"trainer.max_steps={steps}", f"seed={seed}", *overrides, output_dir=output_dir,
    )  # fmt: skip
    run_stage(cfg)
    return (
        list(logged(output_dir, "train/reward/mean").values()),
        list(logged(output_dir, "train/tools/calls_per_sample").values()),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_teaches_the_model_to_call_the_tool(tool_habits, tmp_path, seed):
    """Seeds 0-2 start at 0.08-0.16 and end at 0.85-0.86 (the mean of the last ten steps); calls per sample rise
    from 0.13-0.22 to 1.00 (docs/results.md)."""
    reward, calls = _rewards(tool_habits, tmp_path, 40, seed)
    assert mean(reward[:3]) <= 0.3 and mean(calls[:3]) <= 0.4, (reward[:3], calls[:3])
    assert mean(reward[-10:]) >= 0.8 and mean(calls[-10:]) >= 0.9, (reward, calls)


def test_with_the_advantage_sign_flipped_it_does_not(tool_habits, tmp_path, monkeypatch):
    advantages = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *args, **kwargs: -advantages(*args, **kwargs))
    # without the stop after 10 steps with no reward spread, which a model that never calls soon reaches
    reward, calls = _rewards(tool_habits, tmp_path, 20, 0, "stage.max_steps_without_signal=0")
    assert mean(reward[-10:]) <= 0.1 and mean(calls[-10:]) <= 0.1, (reward, calls)
