"""The one model backbone every stage trains, and the one `parallelize` that shards it.

`CausalLM` wraps any HF causal LM so that the FSDP root unit covers the embeddings, final norm and LM head while
each decoder layer is its own unit; its `forward` returns per-token log-probs through the chunked LM head (no
[tokens, vocab] logits), and `generate` is registered as an FSDP forward method so sampling works sharded.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from thinkforge.config import HardwareConfig, ModelConfig
from thinkforge.losses import token_logprobs
from thinkforge.tokenizer import build_synthetic_tokenizer

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(requested: str) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU (CPUs here have no fast bf16)."""
    if requested != "auto":
        return TORCH_DTYPES[requested]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    source = model.tokenizer or model.name_or_path
    if source is None:
        return build_synthetic_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_model(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    attn = resolve_attn_implementation(model.attn_implementation)
    dtype = resolve_dtype(model.dtype)
    if model.name_or_path is not None:
        hf_model = AutoModelForCausalLM.from_pretrained(
            model.name_or_path,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,
        )
    else:
        assert model.config is not None
        fields: dict[str, Any] = dict(model.config)
        config = AutoConfig.for_model(
            fields.pop("model_type"),
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **fields,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.init_seed)
            hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if len(tokenizer) > hf_model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{hf_model.get_input_embeddings().num_embeddings}: they do not belong together"
        )
    if getattr(hf_model.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported by the chunked LM head yet")
    hf_model.config.use_cache = False
    hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("model: %s, %.2fM parameters, attention=%s, dtype=%s", model.name_or_path or "from config",
             sum(p.numel() for p in hf_model.parameters()) / 1e6, attn, dtype)
    return hf_model


class CausalLM(nn.Module):
    def __init__(self, hf_model: PreTrainedModel, logprob_chunk_size: int = 2048) -> None:
        super().__init__()
        self.hf = hf_model
        self.logprob_chunk_size = logprob_chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        with_entropy: bool = False,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-position log p(labels) [B, L] (0 where the label is ignored), and optionally the entropy, both of
        the distribution softmax(logits / temperature) that a sampler at that temperature draws from.

        Packed rows pass position_ids and no attention_mask: the attention backend then keeps each document to
        itself. Padded prompt batches (generation-time scoring) pass an attention_mask instead.
        """
        hidden = self.hf.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        head = self.hf.get_output_embeddings()
        return token_logprobs(
            hidden, head.weight, labels, chunk_size=self.logprob_chunk_size, with_entropy=with_entropy, temperature=temperature
        )

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.hf.generate(**kwargs)


def decoder_layers(model: CausalLM) -> list[nn.Module]:
    """The repeated blocks, found through HF's own `_no_split_modules` so any decoder architecture works."""
    names = set(getattr(model.hf, "_no_split_modules", None) or ())
    layers = [module for module in model.hf.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model.hf).__name__} (no _no_split_modules)")
    return layers


def parallelize(model: CausalLM, mesh: Any, hardware: HardwareConfig) -> CausalLM:
    """FSDP2: `fully_shard` each decoder layer, then the root. A no-op without a device mesh (one process).

    Order matters (as in torchtitan): activation checkpointing is applied when the model is loaded, before
    sharding; layers are sharded before the root so the root unit only owns embeddings, final norm and LM head.
    """
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = MixedPrecisionPolicy()
    if hardware.mixed_precision is not None:
        policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[hardware.mixed_precision], reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=data_parallel, mp_policy=policy, reshard_after_forward=hardware.reshard_after_forward)
    fully_shard(model, mesh=data_parallel, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")
    return model
