"""LoRA through peft: the adapter that trains, the base weights it leaves alone, and the merged weights that
rollout engines and exports read.

peft's `PeftModel` wraps the HF model inside `CausalLM`, so FSDP shards the adapter with its layer and every
stage trains it through the same backbone. Its parameter names carry peft's prefix and `.base_layer`; the merged
weights come out under the plain HF names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from thinkforge.config import LoraConfig

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"


def add_adapter(hf_model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """The model with a fresh LoRA adapter (B = 0: it starts as the base model); only the adapter trains."""
    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates an int; it scales by alpha / r either way
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(hf_model, config)


def has_adapter(hf_model: torch.nn.Module) -> bool:
    return isinstance(hf_model, PeftModel)


def base_weights(hf_model: torch.nn.Module | None) -> contextlib.AbstractContextManager[None]:
    """Inside it the model computes with its base weights alone: the starting checkpoint, without a copy."""
    return hf_model.disable_adapter() if isinstance(hf_model, PeftModel) else contextlib.nullcontext()


def whole_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: gathered from its FSDP shards (every rank together), or itself."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def hf_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` -> `model.layers.0.mlp.up_proj.weight`."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(BASE_LAYER + ".", ".")


def merged_weights(
    model: torch.nn.Module, full: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the HF model with the active adapter folded in, W + scaling · B A, under its HF name (a tied
    weight under each of its names); `full` turns a parameter into its whole tensor (an FSDP gather, which every
    rank makes in the same order). One layer's weights are whole at a time, never the whole model."""
    adapter = str(model.active_adapter)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        weight = full(parameter).detach()
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(BASE_LAYER) and leaf == "weight":
            layer = model.get_submodule(owner.removesuffix(BASE_LAYER))
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                down_proj, up_proj = layer.lora_A[adapter], layer.lora_B[adapter]
                assert isinstance(down_proj, torch.nn.Linear) and isinstance(up_proj, torch.nn.Linear)
                down, up = full(down_proj.weight).detach(), full(up_proj.weight).detach()
                weight = weight + (up @ down).to(weight.dtype) * layer.scaling[adapter]
        yield hf_name(name), weight
