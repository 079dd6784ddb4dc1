"""Packed causal-LM training (mid-training, or SFT with stage=sft): tokens/s, fill ratio and model-FLOPs
utilisation against this machine's matmul peak.

    python scripts/bench_midtrain.py                      # the tiny default model on the synthetic task
    python scripts/bench_midtrain.py model.config.hidden_size=512 data.max_sequence_length=1024 --steps 20

Arguments are Hydra overrides of conf/train.yaml. The peak is measured here in the compute dtype (fp32 on CPU, bf16
on GPU) with square matmuls, so MFU compares the trainer with what this machine can actually do.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir

from thinkforge.backbone import CausalLM, compute_dtype, load_hf_model, parallelize
from thinkforge.cli import config_dir
from thinkforge.config import validate
from thinkforge.data.loader import StepBatches
from thinkforge.losses import causal_lm_loss
from thinkforge.stage_configs import register_configs
from thinkforge.stages.causal import CausalLMStage
from thinkforge.training import build_stage


def matmul_peak_flops(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 10, trials: int = 3) -> float:
    """The best of `trials` timings of square matmuls: a busy or throttled moment must not inflate the MFU."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def flops_per_token(parameters: int, num_layers: int, hidden: int, context: float) -> float:
    """6·N for the dense matmuls (forward + backward) plus the attention scores, PaLM-style, over `context` keys:
    a packed document's own length, not the row's (the rest of the row is masked out)."""
    return 6 * parameters + 12 * num_layers * hidden * context


@dataclass
class CausalBench:
    device: str
    parameters: int
    row_length: int
    tokens_per_s: float
    fill_ratio: float
    peak_flops: float
    mfu: float

    def lines(self) -> list[str]:
        return [
            f"model             {self.parameters / 1e6:.2f}M parameters, rows of {self.row_length} tokens",
            f"tokens/s          {self.tokens_per_s:,.0f}",
            f"fill ratio        {self.fill_ratio:.3f}",
            f"matmul peak       {self.peak_flops / 1e9:,.1f} GFLOP/s",
            f"model FLOPs util  {self.mfu:.1%}",
        ]


def run_causal_bench(overrides: list[str], steps: int, warmup: int, profile: int = 0) -> CausalBench:
    """`steps` optimizer steps after `warmup` of the composed stage (midtrain by default, or stage=sft); `profile`:
    print that many of the measured steps' top operators by self CPU time (torch.profiler)."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        run = validate(compose("train", overrides=["output_dir=unused", *overrides]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype(run.model.dtype)
    stage = build_stage(run)
    if not isinstance(stage, CausalLMStage):
        raise SystemExit(f"{type(stage).__name__} is not a packed causal-LM stage; use scripts/bench_grpo.py for GRPO")
    rows = stage.build_items("train")
    # fp32 master weights, compute in `dtype`, through `parallelize` (hardware.compile): what training does
    model = CausalLM(load_hf_model(run.model, stage.chat, param_dtype=torch.float32), run.model.logprob_chunk_size)
    model = parallelize(model.to(device), None, run.hardware, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.optim.lr)
    batches = StepBatches(
        rows,
        batch_size=run.data.batch_size,
        micro_batch_size=run.data.micro_batch_size,
        collate=stage.collate,
        seed=0,
        rank=0,
        world_size=1,
        start_step=0,
        lengths=[stage.item_length(row) for row in rows] if run.data.group_by_length else None,
    )
    tokens = slots = 0
    elapsed = 0.0

    def run_step(step: int) -> None:
        nonlocal tokens, slots, elapsed
        micro_batches = [{k: v.to(device) for k, v in b.items()} for b in batches.rank_batch(step)]
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        units = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        for batch in micro_batches:
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                logprobs, _ = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
            (causal_lm_loss(logprobs, batch["labels"]).total / units).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            elapsed += time.perf_counter() - started
            tokens += sum(int(b["num_tokens"]) for b in micro_batches)
            slots += sum(int(b["num_slots"]) for b in micro_batches)

    for step in range(warmup + steps):
        run_step(step)
    throughput, fill = tokens / elapsed, tokens / slots
    if profile:  # one more step, outside the measurement: the profiler slows what it watches
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            run_step(warmup + steps)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    config = model.hf.config
    lengths = [len(document) for row in rows for document in row]
    context = sum(length**2 for length in lengths) / sum(lengths)  # the document length an average token sits in
    per_token = flops_per_token(
        sum(p.numel() for p in model.parameters()), config.num_hidden_layers, config.hidden_size, context
    )
    peak = matmul_peak_flops(dtype, device)
    return CausalBench(
        device=f"{device} ({torch.get_num_threads()} threads), dtype {dtype}, attention {config._attn_implementation}",
        parameters=sum(p.numel() for p in model.parameters()),
        row_length=run.data.max_sequence_length,
        tokens_per_s=throughput,
        fill_ratio=fill,
        peak_flops=peak,
        mfu=throughput * per_token / peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N operators of one more step"
    )
    args, overrides = parser.parse_known_args()
    bench = run_causal_bench(overrides, args.steps, args.warmup, args.profile)
    print(f"device            {bench.device}")
    print("\n".join(bench.lines()))


if __name__ == "__main__":
    main()
