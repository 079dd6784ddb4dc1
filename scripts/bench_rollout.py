"""Rollout options side by side: new tokens/s of each, and whether greedy decoding gives plain `generate`'s tokens.

    python scripts/bench_rollout.py                      # the compare_trl model, 8 MATH-500 prompts x 4 samples x 64
    python scripts/bench_rollout.py --options plain shared_prefill static

Options: `plain` (HF generate, dynamic cache, as TRL runs it), `shared_prefill` (thinkforge's HF engine: each prompt
prefilled once for its samples), `static` (HF's static KV cache), `compiled` (static cache with the decode step
under torch.compile), `generate_batch` (transformers' continuous batching with paged attention). An option that
fails on this machine prints its error instead of a number.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from compare_trl import build_model, read_jsonl
from thinkforge.backbone import load_hf_model, load_tokenizer
from thinkforge.config import ModelConfig
from thinkforge.rollout import HFEngine, SamplingConfig
from thinkforge.tokenizer import render_prompt

OPTIONS = ("plain", "shared_prefill", "static", "compiled", "generate_batch")


def hf_generate(model, tokenizer, prompts: list[str], samples: int, new_tokens: int, greedy: bool, **options) -> list[list[int]]:
    tokenizer.padding_side = "left"
    inputs = tokenizer([p for p in prompts for _ in range(samples)], return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy, top_k=0,
        pad_token_id=tokenizer.pad_token_id, **options,
    )
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def generate_batch(model, tokenizer, prompts: list[str], samples: int, new_tokens: int, greedy: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(samples)]
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy, top_k=0,
                              eos_token_id=model.generation_config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    results = model.generate_batch(inputs=ids, generation_config=config)
    return [list(results[key].generated_tokens) for key in sorted(results, key=lambda k: int(k.split("_")[-1]))]


def runner(option: str, model, tokenizer) -> Callable[[list[str], int, int, bool], list[list[int]]]:
    if option == "shared_prefill":
        def engine(prompts, samples, new_tokens, greedy):
            sampling = SamplingConfig(samples, 0.0 if greedy else 1.0, 1.0, new_tokens)
            return [list(r.token_ids) for g in HFEngine(model, tokenizer, batch_size=len(prompts) * samples).generate(prompts, sampling, seed=0) for r in g]
        return engine
    if option == "generate_batch":
        return lambda *args: generate_batch(model, tokenizer, *args)
    options = {"plain": {}, "static": {"cache_implementation": "static"}}.get(option)
    if option == "compiled":
        from transformers import CompileConfig

        options = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=False, dynamic=False)}
    return lambda *args: hf_generate(model, tokenizer, *args, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        build_model(args.benchmarks, Path(work))
        model_cfg = ModelConfig(name_or_path=work, dtype="float32", attn_implementation="sdpa")
        tokenizer = load_tokenizer(model_cfg)
        model = load_hf_model(model_cfg, tokenizer).eval()
    model.generation_config.eos_token_id = None  # random weights: every row decodes all --new-tokens tokens
    prompts = [render_prompt(tokenizer, row["problem"]) for row in read_jsonl(args.benchmarks / "math500.jsonl")[: args.prompts]]
    new_tokens = args.prompts * args.samples * args.new_tokens
    reference = runner("plain", model, tokenizer)(prompts, args.samples, 16, True)
    print(f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, sampled at T=1, "
          f"{torch.get_num_threads()} threads")
    for option in args.options:
        run = runner(option, model, tokenizer)
        try:
            with torch.no_grad():
                greedy_same = [row[:16] for row in run(prompts, args.samples, 16, True)] == reference
                run(prompts, args.samples, args.new_tokens, False)  # warm-up (and compilation)
                started = time.perf_counter()
                run(prompts, args.samples, args.new_tokens, False)
                seconds = time.perf_counter() - started
        except Exception as error:  # an option this machine or version cannot run is reported, not fatal
            print(f"{option:15s} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            continue
        print(f"{option:15s} {new_tokens / seconds:8,.0f} new tokens/s  {seconds:6.2f} s  greedy tokens as plain: {greedy_same}")


if __name__ == "__main__":
    main()
