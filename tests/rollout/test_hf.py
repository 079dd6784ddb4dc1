"""The HF engine's prompt-shared prefill samples exactly what plain `generate` samples."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_QWEN as MODEL

from thinkforge.backbone import load_hf_model
from thinkforge.config import ModelConfig
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_gives_the_same_tokens_and_logprobs(chat, temperature):
    model = load_hf_model(ModelConfig(config=dict(MODEL), attn_implementation="sdpa", dtype="float32"), chat).eval()
    # prompts of very different lengths: the short ones sit behind a lot of left padding
    prompts = [chat.prompt(text) for text in ("1+1", "What is 12*7 - 3*(4+5)? " * 6, "2*3")]
    sampling = SamplingParams(num_samples=3, temperature=temperature, max_new_tokens=12)
    shared = HFEngine(model, chat, batch_size=5, share_prefill=True).generate(prompts, sampling, seed=7)
    plain = HFEngine(model, chat, batch_size=5, share_prefill=False).generate(prompts, sampling, seed=7)
    for shared_group, plain_group in zip(shared, plain, strict=True):
        for ours, reference in zip(shared_group, plain_group, strict=True):
            assert ours.token_ids == reference.token_ids
            torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(reference.logprobs), atol=1e-5, rtol=0)


def test_the_rotary_notice_of_every_weight_sync_is_dropped():
    from thinkforge.rollout.vllm import RotaryNoticeFilter

    def record(message):
        return logging.LogRecord("vllm.model_executor", logging.WARNING, __file__, 1, message, (), None)

    notice = RotaryNoticeFilter()
    assert not notice.filter(record("RotaryEmbedding: Failed to load weights from the checkpoint"))
    assert notice.filter(record("Failed to load weights of layer 3"))
