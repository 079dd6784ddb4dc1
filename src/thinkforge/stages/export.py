"""The HF checkpoint a stage hands to the next one, consolidated from FSDP shards where there are any."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from lightning.pytorch.strategies import Strategy
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from thinkforge.adapters import hf_name, merged_weights, whole_tensor
from thinkforge.backbone import CausalLM, checkpoint_dtype
from thinkforge.config import ModelConfig

log = logging.getLogger(__name__)

#: the best held-out point's export (`heldout.keep_best`), beside the last step's `export/`
BEST_EXPORT = "export_best"


def export_hf(
    policy: CausalLM, tokenizer: PreTrainedTokenizerBase, model: ModelConfig, strategy: Strategy, directory: Path
) -> None:
    """Every rank joins the gather; rank 0 writes the model in its checkpoint dtype and the tokenizer. With a LoRA
    adapter: the model with the adapter merged in (`model.lora.export=merged`) or the adapter alone (`adapter`)."""
    if model.lora.rank and model.lora.export == "merged":
        state = {}
        for name, weight in merged_weights(policy.hf, whole_tensor):  # every rank joins every gather
            if strategy.is_global_zero:
                state[name] = weight.cpu()
        base = cast(PreTrainedModel, cast(PeftModel, policy.hf).get_base_model())
    else:
        # full_state_dict: every value a whole tensor (DTensor shards gathered)
        full = cast(
            dict[str, torch.Tensor],
            get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        )
        state = {name.removeprefix("hf."): tensor for name, tensor in full.items()}
        base = policy.hf
    if strategy.is_global_zero:
        if model.lora.rank and model.lora.export == "adapter":
            save_adapter(policy, state, model, directory)
        else:
            save_model(base, state.items(), model, directory)
        tokenizer.save_pretrained(directory)
        log.info("exported HF checkpoint to %s", directory)
    strategy.barrier("export")


def save_model(
    hf_model: PreTrainedModel, state: Iterable[tuple[str, torch.Tensor]], model: ModelConfig, directory: Path
) -> None:
    """The weights under HF names, in the checkpoint dtype: a bf16 model stays bf16 on disk (the fp32 masters are
    for training). Gathered copies no longer share storage, so HF cannot see tied weights: their targets go."""
    tied = set(getattr(hf_model, "all_tied_weights_keys", None) or ())
    dtype = checkpoint_dtype(model)
    weights = {name: tensor.to(dtype) for name, tensor in state if name not in tied}
    hf_model.save_pretrained(directory, state_dict=weights, safe_serialization=True)


def save_adapter(policy: CausalLM, state: dict[str, torch.Tensor], model: ModelConfig, directory: Path) -> None:
    """peft's adapter files, naming their base: the starting checkpoint, or, for a model built from a config,
    its weights saved beside the adapter in `base/`."""
    lora = cast(PeftModel, policy.hf)
    adapter = str(lora.active_adapter)
    if model.name_or_path is None:
        base_state = ((hf_name(name), tensor) for name, tensor in state.items() if ".lora_" not in name)
        save_model(cast(PreTrainedModel, lora.get_base_model()), base_state, model, directory / "base")
    lora.peft_config[adapter].base_model_name_or_path = str(
        (directory / "base").resolve() if model.name_or_path is None else model.name_or_path
    )
    lora.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
