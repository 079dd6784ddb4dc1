"""A tokenizer whose chat turn ends with another token than its EOS (as Qwen2.5 base tokenizers do): what SFT
trains, where generation stops, what counts as finished and how DPO ends a reply must all agree."""

from __future__ import annotations

import pytest
from conftest import FAST, compose_config
from transformers import AutoTokenizer

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.chat import ChatFormat, turn_end_token
from thinkforge.config import validate
from thinkforge.data.packing import IGNORE_INDEX
from thinkforge.rollout.base import rollout_of
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams
from thinkforge.stages.dpo import DPO
from thinkforge.stages.sft import SFT
from thinkforge.tokenizer import build_synthetic_tokenizer


@pytest.fixture(scope="module")
def qwen_base_like(tmp_path_factory):
    """The built-in tokenizer, saved with EOS `<|endoftext|>`; its chat template still ends turns with `<|im_end|>`."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_synthetic_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(directory)
    return directory


def _run(directory, tmp_path, *overrides):
    return validate(compose_config(*FAST, f"model.tokenizer={directory}", *overrides, output_dir=tmp_path))


def test_turn_end_is_found_from_the_template(qwen_base_like):
    tokenizer = AutoTokenizer.from_pretrained(qwen_base_like)
    assert tokenizer.eos_token == "<|endoftext|>" and turn_end_token(tokenizer) == "<|im_end|>"
    turn_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert ChatFormat(tokenizer).end_ids == [turn_end, eos]
    assert ChatFormat(tokenizer, declared_ends=[eos, 7]).end_ids == [turn_end, eos, 7]
    assert ChatFormat(tokenizer).turn_end_id == turn_end


def test_sft_targets_generation_stop_and_finished_agree(qwen_base_like, tmp_path, monkeypatch):
    run = _run(qwen_base_like, tmp_path, "stage=sft")
    chat = ChatFormat.for_model(run.model)
    tokenizer = chat.tokenizer
    turn_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    sequence = SFT(run, chat).assistant_only(
        [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    )
    targets = [label for label in sequence.labels if label != IGNORE_INDEX]
    assert targets == [*tokenizer.encode("4", add_special_tokens=False), turn_end], (
        "the reply and its turn end, no more"
    )

    model = CausalLM(load_hf_model(run.model, chat))
    assert model.generation_config.eos_token_id == [turn_end, eos], "exported generation_config stops at both"
    engine = HFEngine(model, chat)
    asked = {}
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: asked.update(kwargs) or generate(**kwargs))
    engine.generate(
        ["<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"], SamplingParams(1, 0.0, 1.0, 4), seed=0
    )
    assert asked["eos_token_id"] == [turn_end, eos]

    reply = tokenizer.encode("4", add_special_tokens=False)
    stopped = rollout_of(tokenizer, 0, reply + [turn_end] + [eos] * 3, [], engine.end_ids, ())
    assert stopped.finished and stopped.text == "4" and stopped.token_ids == (*reply, turn_end)
    truncated = rollout_of(tokenizer, 0, reply * 4, [], engine.end_ids, ())
    assert not truncated.finished and truncated.token_ids == tuple(reply * 4)


def test_dpo_ends_finished_replies_with_the_turn_end_and_truncated_ones_with_nothing(qwen_base_like, tmp_path):
    run = _run(qwen_base_like, tmp_path, "stage=dpo")
    chat = ChatFormat.for_model(run.model)
    tokenizer = chat.tokenizer
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stage = DPO(run, chat)
    prompt = tokenizer.encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    reply = tokenizer.encode("<think>\nhm", add_special_tokens=False)
    assert stage.completion_ids(prompt, "<think>\nhm", finished=True) == (*reply, turn_end)
    assert stage.completion_ids(prompt, "<think>\nhm", finished=False) == tuple(reply)
