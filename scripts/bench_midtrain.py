"""Mid-training throughput: tokens/s, fill ratio and model-FLOPs utilisation against this machine's matmul peak.

    python scripts/bench_midtrain.py                      # the tiny default model on the synthetic task
    python scripts/bench_midtrain.py model.config.hidden_size=512 data.max_length=1024 --steps 20

Arguments are Hydra overrides of conf/train.yaml. The peak is measured here in the compute dtype (fp32 on CPU, bf16 on GPU) with
square matmuls, so MFU compares the trainer with what this machine can actually do.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from thinkforge.backbone import CausalLM, compute_dtype, load_hf_model, load_tokenizer
from thinkforge.cli import config_dir
from thinkforge.config import validate
from thinkforge.stage_configs import register_configs
from thinkforge.data.loader import StepBatches
from thinkforge.losses import causal_lm_loss
from thinkforge.stages.midtrain import MidTraining


def matmul_peak_flops(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def flops_per_token(model: torch.nn.Module, num_layers: int, hidden: int, context: int) -> float:
    """6·N for the dense matmuls (forward + backward) plus the attention scores, PaLM-style."""
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * num_layers * hidden * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        run = validate(compose("train", overrides=["output_dir=unused", *overrides]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype(run.model.dtype)
    tokenizer = load_tokenizer(run.model)
    stage = MidTraining(run, tokenizer)
    rows = stage.build_items("train")
    # fp32 master weights, compute in `dtype`: what training does
    model = CausalLM(load_hf_model(run.model, tokenizer, param_dtype=torch.float32), run.model.logprob_chunk_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.optim.lr)
    batches = StepBatches(
        rows, batch_size=run.data.batch_size, micro_batch_size=run.data.micro_batch_size, collate=stage.collate,
        seed=0, rank=0, world_size=1, start_step=0,
    )
    tokens = slots = 0
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
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
        if step >= args.warmup:
            elapsed += time.perf_counter() - started
            tokens += sum(int(b["num_tokens"]) for b in micro_batches)
            slots += sum(int(b["num_slots"]) for b in micro_batches)
    config = model.hf.config
    per_token = flops_per_token(model, config.num_hidden_layers, config.hidden_size, run.data.max_length)
    peak = matmul_peak_flops(dtype, device)
    throughput = tokens / elapsed
    print(f"device            {device} ({torch.get_num_threads()} threads), dtype {dtype}, attention {config._attn_implementation}")
    print(f"model             {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, rows of {run.data.max_length} tokens")
    print(f"tokens/s          {throughput:,.0f}  ({args.steps} steps of {run.data.batch_size} rows)")
    print(f"fill ratio        {tokens / slots:.3f}")
    print(f"matmul peak       {peak / 1e9:,.1f} GFLOP/s")
    print(f"model FLOPs util  {throughput * per_token / peak:.1%}")


if __name__ == "__main__":
    main()
