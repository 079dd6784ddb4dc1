"""The HF checkpoint a stage hands to the next one, consolidated from FSDP shards where there are any."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.strategies import Strategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedTokenizerBase

from thinkforge.backbone import CausalLM, checkpoint_dtype
from thinkforge.config import ModelConfig

log = logging.getLogger(__name__)


def export_hf(
    policy: CausalLM, tokenizer: PreTrainedTokenizerBase, model: ModelConfig, strategy: Strategy, directory: Path
) -> None:
    """Every rank joins the gather; rank 0 writes the model in its checkpoint dtype and the tokenizer."""
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if strategy.is_global_zero:
        # Gathered copies no longer share storage, so HF cannot see tied weights: drop their targets ourselves.
        tied = set(getattr(policy.hf, "all_tied_weights_keys", None) or ())
        dtype = checkpoint_dtype(model)  # a bf16 model stays bf16 on disk; the fp32 masters are for training
        state = {
            key: tensor.to(dtype) for name, tensor in state.items() if (key := name.removeprefix("hf.")) not in tied
        }
        policy.hf.save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        log.info("exported HF checkpoint to %s", directory)
    strategy.barrier("export")
