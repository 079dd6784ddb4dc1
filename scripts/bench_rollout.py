"""Rollout options side by side, in one process: new tokens/s of each, and whether greedy decoding gives plain
`generate`'s tokens.

    python scripts/bench_rollout.py                        # the compare_trl model, 8 MATH-500 prompts x 4 samples x 64
    python scripts/bench_rollout.py --model demo --options plain shared_prefill vllm
    python scripts/bench_rollout.py --model smollm2 --prompts 16 --samples 1 --new-tokens 256 \
        --options plain shared_prefill vllm

`--model`: an HF directory, `demo` (the demo's ~3M model, random weights) or `smollm2` (SmolLM2-135M-Instruct,
`thinkforge-data smollm2`); by default the 25.8M model of scripts/compare_trl.py. Random-weight models decode every
row to --new-tokens tokens; a real model stops at its end token, and only the tokens up to it are counted.

Options: `plain` (HF generate, dynamic cache, as TRL runs it), `shared_prefill` (thinkforge's HF engine: each prompt
prefilled once for its samples, KV cache preallocated), `static` (HF's static KV cache), `compiled` (static cache
with the decode step under torch.compile), `generate_batch` (transformers' continuous batching with paged
attention), `vllm` (thinkforge's vLLM engine, after scripts/install_vllm_cpu.sh). An option that fails on this
machine prints its error instead of a number.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from compare_trl import build_model, read_jsonl

from thinkforge.backbone import load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import ModelConfig
from thinkforge.rollout.hf import HFEngine
from thinkforge.rollout.settings import SamplingParams, VLLMEngineConfig

OPTIONS = ("plain", "shared_prefill", "static", "compiled", "generate_batch", "vllm")
DEMO_MODEL = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def until_end(rows: list[list[int]], end_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first end token: what a sampler really generated."""
    return [row[: next((i + 1 for i, token in enumerate(row) if token in end_ids), len(row))] for row in rows]


def hf_generate(
    model, tokenizer, end_ids, prompts: list[str], samples: int, new_tokens: int, greedy: bool, **options
) -> list[list[int]]:
    tokenizer.padding_side = "left"
    inputs = tokenizer(
        [p for p in prompts for _ in range(samples)], return_tensors="pt", padding=True, add_special_tokens=False
    )
    output = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=not greedy,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )
    return until_end(output[:, inputs["input_ids"].shape[1] :].tolist(), end_ids)


def generate_batch(
    model, tokenizer, end_ids, prompts: list[str], samples: int, new_tokens: int, greedy: bool
) -> list[list[int]]:
    from transformers import GenerationConfig

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(samples)]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=not greedy,
        top_k=0,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    results = model.generate_batch(inputs=ids, generation_config=config)
    return until_end(
        [list(results[key].generated_tokens) for key in sorted(results, key=lambda k: int(k.split("_")[-1]))], end_ids
    )


def runner(option: str, model, tokenizer, model_dir: Path) -> Callable[[list[str], int, int, bool], list[list[int]]]:
    end_ids = list(model.generation_config.eos_token_id or [])
    if option in ("shared_prefill", "vllm"):
        if option == "vllm":
            from thinkforge.rollout.vllm import VLLMEngine

            engine = VLLMEngine(model_dir, ChatFormat(tokenizer), VLLMEngineConfig(), max_model_len=2048, seed=0)
            engine.end_ids = end_ids  # random weights: no end token, decode to the budget as the HF options do
        else:
            engine = HFEngine(model, ChatFormat(tokenizer), batch_size=1024)
            engine.end_ids = end_ids or [-1]  # -1: a token no row samples

        def sample(prompts, samples, new_tokens, greedy):
            sampling = SamplingParams(samples, 0.0 if greedy else 1.0, 1.0, new_tokens)
            return [list(r.token_ids) for g in engine.generate(prompts, sampling, seed=0) for r in g]

        return sample
    if option == "generate_batch":
        return lambda *args: generate_batch(model, tokenizer, end_ids, *args)
    options = {"plain": {}, "static": {"cache_implementation": "static"}}.get(option)
    if option == "compiled":
        from transformers import CompileConfig

        options = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=False, dynamic=False)}
    return lambda *args: hf_generate(model, tokenizer, end_ids, *args, **options)


def model_directory(name: str | None, benchmarks: Path, work: Path) -> tuple[Path, bool]:
    """The model to sample and whether its weights are random (then no row may stop early)."""
    if name == "smollm2":
        from thinkforge.pretrained import convert_smollm2

        return convert_smollm2(), False
    if name == "demo":
        from thinkforge.tokenizer import build_synthetic_tokenizer

        tokenizer = build_synthetic_tokenizer()
        load_hf_model(
            ModelConfig(config=dict(DEMO_MODEL), dtype="float32"), ChatFormat(tokenizer), param_dtype=torch.float32
        ).save_pretrained(work)
        tokenizer.save_pretrained(work)
        return work, True
    if name:
        return Path(name), False
    build_model(benchmarks, work)
    return work, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks"
    )
    parser.add_argument("--model", default=None, help="an HF directory, demo or smollm2 (default: compare_trl's model)")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gsm8k", action="store_true", help="GSM8K questions as prompts instead of MATH-500 problems")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir, random_weights = model_directory(args.model, args.benchmarks, Path(work))
        model_cfg = ModelConfig(name_or_path=str(model_dir), dtype="float32", attn_implementation="sdpa")
        chat = ChatFormat.for_model(model_cfg)
        tokenizer = chat.tokenizer
        model = load_hf_model(model_cfg, chat).eval()
        if random_weights:
            model.generation_config.eos_token_id = None  # every row decodes all --new-tokens tokens
        rows = read_jsonl(args.benchmarks / ("gsm8k_test.jsonl" if args.gsm8k else "math500.jsonl"))[: args.prompts]
        prompts = [chat.prompt(row.get("problem") or row["question"]) for row in rows]
        reference = runner("plain", model, tokenizer, model_dir)(prompts, args.samples, 16, True)
        print(
            f"{model_dir.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
            f"{args.prompts} prompts x {args.samples} samples x up to {args.new_tokens} new tokens, sampled at T=1, "
            f"{torch.get_num_threads()} threads"
        )
        results = {}
        for option in args.options:
            try:
                run = runner(option, model, tokenizer, model_dir)
                with torch.no_grad():
                    greedy_same = [row[:16] for row in run(prompts, args.samples, 16, True)] == reference
                    run(prompts, args.samples, args.new_tokens, False)  # warm-up (and compilation)
                    started = time.perf_counter()
                    generated = sum(len(row) for row in run(prompts, args.samples, args.new_tokens, False))
                    seconds = time.perf_counter() - started
            except Exception as error:  # an option this machine or version cannot run is reported, not fatal
                print(f"{option:15s} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            results[option] = generated / seconds
            print(
                f"{option:15s} {generated / seconds:8,.0f} new tokens/s  {generated:6d} tokens in {seconds:6.2f} s  "
                f"greedy tokens as plain: {greedy_same}"
            )
        if "plain" in results:
            print(
                "ratios to plain generate: "
                + ", ".join(
                    f"{name} {rate / results['plain']:.2f}x" for name, rate in results.items() if name != "plain"
                )
            )


if __name__ == "__main__":
    main()
