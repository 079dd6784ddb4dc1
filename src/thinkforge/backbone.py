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
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from thinkforge.adapters import add_adapter
from thinkforge.chat import ChatFormat
from thinkforge.config import HardwareConfig, ModelConfig
from thinkforge.data.packing import IGNORE_INDEX

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_attn_implementation(requested: str, model_class: type[PreTrainedModel] | None = None) -> str:
    """`auto`: FlashAttention-2 on GPU when installed, else SDPA, else (architectures without SDPA) eager."""
    if requested != "auto":
        return requested
    flash_installed = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if flash_installed and (model_class is None or getattr(model_class, "_supports_flash_attn", False)):
        return "flash_attention_2"
    if model_class is None or getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    log.info("attention: %s supports neither FlashAttention-2 nor SDPA; using eager", model_class.__name__)
    return "eager"


def compute_dtype(requested: str) -> torch.dtype:
    """The dtype matmuls run in. `auto` is bf16 on GPU and fp32 on CPU (CPUs here have no fast bf16). Training
    keeps parameters and optimizer state in fp32 whatever this is: bf16 weights would round away small updates."""
    if requested != "auto":
        return TORCH_DTYPES[requested]
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def checkpoint_dtype(model: ModelConfig) -> torch.dtype:
    """The dtype the starting weights are stored in (fp32 for a model built from a config): exports keep it."""
    if model.name_or_path is None:
        return torch.float32
    config = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def load_for_generation(model_cfg: ModelConfig, chat: ChatFormat) -> PreTrainedModel:
    """A model for sampling outside training (evaluation, curation), in the compute dtype on the GPU when there is
    one. Inside a stage, sampling uses the stage's own (sharded) policy instead."""
    model = load_hf_model(model_cfg, chat)
    if torch.cuda.is_available():
        model.to(torch.device("cuda"))  # type: ignore[arg-type]  # transformers wraps `to` loosely
    model.eval()
    return model


def load_hf_model(model: ModelConfig, chat: ChatFormat, *, param_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The HF model with its parameters in `param_dtype`: fp32 master weights for training, or by default the
    compute dtype, for inference only; it stops at the chat format's end tokens."""
    tokenizer = chat.tokenizer
    dtype = param_dtype or compute_dtype(model.dtype)
    if model.name_or_path is not None:
        config = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
        attn = resolve_attn_implementation(model.attn_implementation, _model_class(config))
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
        attn = resolve_attn_implementation(model.attn_implementation, _model_class(config))
        # initialised on the CPU whatever device is current (Lightning builds a single-GPU model under the GPU, an
        # FSDP one under none): the same seed gives the same weights on every device and strategy
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(model.init_seed)
            hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    embedding = hf_model.get_input_embeddings().weight
    assert isinstance(embedding, torch.Tensor)
    if len(tokenizer) > embedding.shape[0]:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{embedding.shape[0]}: they do not belong together"
        )
    if getattr(hf_model.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported by the chunked LM head yet")
    hf_model.config.use_cache = False
    hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    # sampling stops at any end token, and the exported generation_config says so to other engines (vLLM)
    hf_model.generation_config.eos_token_id = chat.end_ids
    if model.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info(
        "model: %s, %.2fM parameters, attention=%s, dtype=%s",
        model.name_or_path or "from config",
        sum(p.numel() for p in hf_model.parameters()) / 1e6,
        attn,
        dtype,
    )
    return hf_model


def _matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the LM-head matmul in (bf16 under bf16 autocast), else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _ChunkScores(torch.autograd.Function):
    """log p(target) of one chunk of positions and, without grad, its entropy, from one LM-head matmul.

    Only the chunk's hidden states and log-normalisers are kept for the backward, which recomputes the logits and
    turns them into their gradient in place, g * (onehot(target) - softmax): one [chunk, vocab] buffer instead of
    autograd's logsumexp and gather backwards (a subtraction, an exponential, a product and a zero-filled scatter,
    each [chunk, vocab]). The temperature scales the hidden states, [chunk, hidden], not the logits.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _matmul_dtype(hidden)
        logits = F.linear((hidden / temperature).to(dtype), weight.to(dtype)).float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        top = logits.amax(dim=-1, keepdim=True)
        shifted = logits.sub_(top)  # in place, as below: the logits are not needed again
        exponentials = shifted.exp() if with_entropy else shifted.exp_()
        total = exponentials.sum(-1)
        normalizer = top.squeeze(-1) + total.log()
        picked = picked - normalizer
        entropy = picked.new_zeros(0)
        if with_entropy:  # H = log Z - sum p * logit, with the logits shifted by their max
            entropy = total.log() - exponentials.mul_(shifted).sum(-1) / total
        ctx.save_for_backward(hidden, weight, targets, normalizer)
        ctx.temperature, ctx.dtype = temperature, dtype
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx: Any, grad_picked: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, normalizer = ctx.saved_tensors
        scaled, matrix = (hidden / ctx.temperature).to(ctx.dtype), weight.to(ctx.dtype)
        grad_logits = (
            F.linear(scaled, matrix).float().sub_(normalizer.unsqueeze(-1)).exp_().mul_(-grad_picked.unsqueeze(-1))
        )
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad_picked.unsqueeze(-1))
        grad_logits = grad_logits.to(ctx.dtype)
        grad_hidden = (grad_logits @ matrix).to(hidden.dtype) / ctx.temperature if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.T @ scaled).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 2048,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position, 0 where the target is IGNORE_INDEX; optionally the entropy (no grad).

    `temperature` divides the logits first: RL must score completions under the distribution that sampled them,
    or its ratio, clipping and KL refer to another policy. Only positions with a target go through the LM head
    (prompts and padding cost nothing there), `chunk_size` rows at a time, in the forward and (recomputed) in the
    backward, so memory stays O(chunk · vocab) instead of O(tokens · vocab). The entropy comes from the same
    logits as the log-probs: one LM-head pass per chunk forward, one in the backward (`_ChunkScores`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive to score samples; got {temperature}")
    flat_targets = targets.reshape(-1)
    scored = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    scored_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
    scored_targets = flat_targets.index_select(0, scored)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, scored.numel(), chunk_size):
        chunk_logprobs, chunk_entropy = _ChunkScores.apply(  # type: ignore[no-untyped-call]
            scored_hidden[start : start + chunk_size],
            lm_head_weight,
            scored_targets[start : start + chunk_size],
            temperature,
            with_entropy,
        )
        logprob_chunks.append(chunk_logprobs)
        if with_entropy:
            entropy_chunks.append(chunk_entropy)

    def placed(chunks: list[torch.Tensor]) -> torch.Tensor:
        # without any target the zeros stay tied to the graph, so a backward through an empty micro-batch works
        values = torch.cat(chunks) if chunks else hidden.sum().float() * 0 + hidden.new_zeros(0, dtype=torch.float32)
        # a fresh tensor, not a view: FSDP2 hooks the backward of module outputs
        return values.new_zeros(flat_targets.numel()).index_copy(0, scored, values).view(targets.shape)

    return placed(logprob_chunks), placed(entropy_chunks) if with_entropy else None


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
        itself. Prompt-shared rows pass their own [B, 1, L, L] boolean mask (SDPA), which transformers uses as is.
        """
        hidden = self.hf.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        head = self.hf.get_output_embeddings()
        return token_logprobs(
            hidden,
            head.weight,
            labels,
            chunk_size=self.logprob_chunk_size,
            with_entropy=with_entropy,
            temperature=temperature,
        )

    @property
    def generation_config(self) -> Any:
        return self.hf.generation_config

    def generate(self, **kwargs: Any) -> Any:
        return self.hf.generate(**kwargs)  # type: ignore[operator]


def decoder_layers(model: CausalLM) -> list[nn.Module]:
    """The repeated blocks, found through HF's own `_no_split_modules` so any decoder architecture works."""
    names = set(getattr(model.hf, "_no_split_modules", None) or ())
    layers = [module for module in model.hf.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model.hf).__name__} (no _no_split_modules)")
    return layers


def _model_class(config: Any) -> type[PreTrainedModel] | None:
    """The class AutoModelForCausalLM would build for `config`, to ask what attention it supports."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # type: ignore[return-value]  # a lazy, loosely typed mapping
    except KeyError:
        return None  # remote code or an unknown architecture: let transformers decide


def parallelize(model: CausalLM, mesh: Any, hardware: HardwareConfig, compute: torch.dtype) -> CausalLM:
    """`hardware.compile`: torch.compile each decoder layer; then FSDP2: `fully_shard` each decoder layer, then the
    root (without a device mesh, one process, nothing is sharded).

    Order matters (as in torchtitan): activation checkpointing is applied when the model is loaded, then compile,
    then sharding; layers are sharded before the root so the root unit only owns embeddings, final norm and LM
    head. The shards stay fp32 (parameters and optimizer state); FSDP casts each all-gathered layer to the compute
    dtype and reduces gradients in fp32.
    """
    if hardware.compile:
        for layer in decoder_layers(model):
            layer.compile()
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = MixedPrecisionPolicy()
    if compute != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=data_parallel, mp_policy=policy, reshard_after_forward=hardware.reshard_after_forward)
    fully_shard(model, mesh=data_parallel, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")
    return model


def build_backbone(
    model_cfg: ModelConfig,
    hardware: HardwareConfig,
    chat: ChatFormat,
    mesh: Any,
    *,
    frozen: bool = False,
) -> CausalLM:
    """The starting checkpoint as every stage holds it: fp32 parameters, `parallelize`d over `mesh` (None: one
    process). The policy trains (from_pretrained returns eval mode; dropout on, where a model has any), with a
    LoRA adapter when `model.lora.rank` is set; `frozen` is a reference model, without gradients."""
    hf_model: Any = load_hf_model(model_cfg, chat, param_dtype=torch.float32)
    if model_cfg.lora.rank and not frozen:
        hf_model = add_adapter(hf_model, model_cfg.lora)
        trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
        log.info("LoRA rank %d: %.3fM trainable parameters", model_cfg.lora.rank, trainable / 1e6)
    model = CausalLM(hf_model, model_cfg.logprob_chunk_size)
    if frozen:
        model.requires_grad_(False).eval()
    else:
        model.train()
    return parallelize(model, mesh, hardware, compute_dtype(model_cfg.dtype))
