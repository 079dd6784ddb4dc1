"""The check after every weight push: the engine's copy must hold what the trainer pushed, or the run stops naming
the tensor. The vLLM side runs in tests/rollout/test_vllm.py."""

from __future__ import annotations

import pytest
import torch

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.config import ModelConfig
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.sampler import PolicySampler
from thinkforge.rollout.settings import RolloutConfig, SamplingParams
from thinkforge.rollout.weight_check import ELEMENTS, PushedSample, WeightSyncError, element_positions

MODEL = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def test_positions_spread_over_the_tensor_and_read_the_same_elements_of_a_copy_with_padded_rows():
    positions = element_positions(torch.Size([100, 8]))
    assert positions.shape == (ELEMENTS, 2) and positions.tolist()[0] == [0, 0] and positions.tolist()[-1] == [99, 7]
    assert element_positions(torch.Size([5])).shape == (5, 1), "a small tensor is read whole"
    weight = torch.randn(100, 8)
    padded = torch.cat([weight, torch.zeros(28, 8)])  # vLLM pads the vocabulary's rows
    index = tuple(positions.T)
    assert torch.equal(weight[index], padded[index])


def pushed(weights: dict[str, torch.Tensor]) -> PushedSample:
    sample = PushedSample()
    passed = list(sample.recording(weights.items()))
    assert [name for name, _ in passed] == list(weights), "the weights pass unchanged, in order"
    return sample


WEIGHTS = {
    "model.embed_tokens.weight": torch.randn(50, 16),
    "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
    "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16),
    "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32),
}


def test_only_the_probed_tensors_are_read_and_an_engine_holding_them_passes_in_its_own_dtype():
    sample = pushed(WEIGHTS)
    assert sorted(sample.positions) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ]
    # a bf16 engine (vLLM on GPU) holds the trainer's fp32 values rounded to bf16
    held = {name: WEIGHTS[name].to(torch.bfloat16)[tuple(index.T)] for name, index in sample.positions.items()}
    sample.check(held, step=3)


def test_a_tensor_the_engine_did_not_take_stops_the_run_naming_it():
    sample = pushed(WEIGHTS)
    engine_values = {name: WEIGHTS[name][tuple(index.T)] for name, index in sample.positions.items()}
    stale = "model.layers.0.mlp.down_proj.weight"
    engine_values[stale] = engine_values[stale].clone()
    engine_values[stale][7] += 1e-3
    with pytest.raises(WeightSyncError, match=rf"step 5: the engine's {stale} is not the trainer's \(1 of 64"):
        sample.check(engine_values, step=5)
    del engine_values[stale]
    with pytest.raises(WeightSyncError, match=rf"the engine has no parameter {stale}"):
        sample.check(engine_values, step=5)
    with pytest.raises(WeightSyncError, match="have none of the tensors the check reads"):
        PushedSample().check({}, step=5)
    # vLLM on CPU empties its repacked linear weights: those are not compared, the others are
    repacked = {name: None for name in sample.positions}
    with pytest.raises(WeightSyncError, match="in a layout the engine keeps"):
        sample.check(repacked, step=5)
    repacked["model.embed_tokens.weight"] = WEIGHTS["model.embed_tokens.weight"][
        tuple(sample.positions["model.embed_tokens.weight"].T)
    ]
    sample.check(repacked, step=5)


class CopyingEngine(HFEngine):
    """An engine with its own copy of the weights that silently keeps its old value of `dropped` at every push (an
    adapter never merged, a name it does not map)."""

    holds_weights = True

    def __init__(self, copy: torch.nn.Module, chat, dropped: str | None = None) -> None:
        super().__init__(copy, chat)
        self.dropped = dropped

    def update_weights(self, weights, *, version=0):
        own = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in weights:
                if name != self.dropped:
                    own[name].copy_(tensor)


def test_the_policy_sampler_stops_at_the_first_push_the_engine_did_not_take(chat):
    policy = CausalLM(load_hf_model(ModelConfig(config=dict(MODEL)), chat))
    copy = load_hf_model(ModelConfig(config=dict(MODEL), init_seed=1), chat)  # other weights until the first push
    sampler = PolicySampler(
        policy, chat, RolloutConfig(), starting_weights=None, export=lambda: None, longest_sequence=64, seed=0,
        world_size=1, compute_context=torch.no_grad,
    )  # fmt: skip
    sampling, prompts = SamplingParams(2, 1.0, 1.0, 4), [chat.prompt("1+1")]
    sampler.engine = CopyingEngine(copy, chat)
    assert len(sampler.generate(prompts, sampling, seed=0, step=1)[0]) == 2
    stale = "model.layers.1.self_attn.o_proj.weight"
    sampler.engine = CopyingEngine(copy, chat, dropped=stale)
    with torch.no_grad():
        policy.hf.model.layers[1].self_attn.o_proj.weight.add_(0.5)
    with pytest.raises(WeightSyncError, match=rf"step 2: the engine's {stale} is not the trainer's \(64 of 64"):
        sampler.generate(prompts, sampling, seed=0, step=2)
