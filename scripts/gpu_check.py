"""What only a GPU shows, checked in a few minutes on one CUDA node, one line per check:

1. a packed row equals its documents run alone (FlashAttention-2 varlen when installed, else SDPA), to bf16 tolerance;
2. 20 steps of bf16 compute over fp32 master weights track an fp32 run;
3. FSDP over all local GPUs gives the losses of one GPU;
4. one GRPO step and one DPO step run;
5. mid-training tokens/s and MFU (scripts/bench_midtrain.py) on a ~100M-parameter model;
6. GRPO with rollout=vllm (when vLLM is installed) on one GPU and under FSDP: weight sync time, the bf16 sampler's
   log-prob gap to the trainer, with token_truncate correction, and sleep mode between the steps;
7. LoRA in bf16: a GRPO step whose KL reference is the base weights (adapter off), and scripts/bench_lora.py's
   peak memory and step time with and without LoRA on the ~100M-parameter model of check 5.

    python scripts/gpu_check.py          # on a CUDA machine
    python scripts/gpu_check.py --cpu    # the same checks on CPU (FSDP over two gloo processes): tests this script

Every training check runs `thinkforge-train` as a user would, in a scratch directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_rollout import DEMO_MODEL

from thinkforge.backbone import CausalLM, load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import ModelConfig
from thinkforge.data import synthetic
from thinkforge.data.packing import TokenSequence, collate_rows
from thinkforge.tokenizer import build_synthetic_tokenizer

SCRIPTS = Path(__file__).resolve().parent
#: the ~100M-parameter size of the throughput and LoRA checks, on the demo model's architecture
HUNDRED_M = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
SHORT = [
    "data.synthetic.num_train=512",
    "data.synthetic.num_val=32",
    "data.max_sequence_length=512",
    "data.batch_size=8",
    "data.micro_batch_size=4",
    "trainer.val_every=1000",
    "heldout.num_prompts=8",
    "heldout.sampling.max_new_tokens=32",
    "optim.warmup_steps=2",
    "logger=csv",
]


def train(workdir: Path, name: str, *overrides: str) -> tuple[dict[int, float], float]:
    """Runs thinkforge-train; returns step -> train/loss and the wall time."""
    run_dir = workdir / name
    started = time.perf_counter()
    command = [str(Path(sys.executable).with_name("thinkforge-train")), *SHORT, *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        losses = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    return losses, time.perf_counter() - started


def largest_relative_gap(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[step] - b[step]) / abs(b[step]) for step in b)


def check_packing(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    tokenizer = build_synthetic_tokenizer()
    config = {
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
    }
    hf_model = load_hf_model(ModelConfig(config=config), ChatFormat(tokenizer), param_dtype=torch.float32)
    model = CausalLM(hf_model).to(device)
    attention = model.hf.config._attn_implementation
    problems = synthetic.generate("train", 3, seed=1)
    documents = [TokenSequence.causal(tokenizer.encode(p.prompt + p.completion)) for p in problems]

    def collate(row: list[TokenSequence]) -> dict[str, torch.Tensor]:
        batch = collate_rows(
            [row], tokenizer.pad_token_id, row_length=sum(map(len, row)), flatten=attention == "flash_attention_2"
        )
        return {k: v.to(device) for k, v in batch.items()}

    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        batch = collate(documents)
        packed, _ = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        alone = []
        for document in documents:
            single = collate([document])
            alone.append(model(single["input_ids"], single["labels"], position_ids=single["position_ids"])[0][0])
    gap = (packed[0] - torch.cat(alone)).abs().max().item()
    return gap < 0.05, f"max |log p| gap {gap:.2e} over {sum(map(len, documents))} tokens ({attention}, {dtype})"


def pairs_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in synthetic.wrong_answer_pairs(64, seed=5)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU, to test this script")
    parser.add_argument("--only", default="", help="run only the checks whose name contains this text")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu to test the script")
    device = "cpu" if args.cpu else "cuda"
    gpus = 2 if args.cpu else torch.cuda.device_count()
    one, many = ("hardware=cpu", "hardware=cpu_fsdp") if args.cpu else ("hardware=gpu", "hardware=fsdp")
    many_devices = [] if args.cpu else [f"hardware.devices={gpus}"]
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} x{gpus}, torch {torch.__version__}")
    results: list[tuple[str, bool, str, float]] = []

    def record(name: str, check) -> None:
        if args.only not in name:
            return
        started = time.perf_counter()
        try:
            ok, measured = check()
        except Exception as error:  # a failing check is reported, and the others still run
            ok, measured = False, f"error: {str(error).strip().splitlines()[-1][:160]}"
        results.append((name, ok, measured, time.perf_counter() - started))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<28} {measured}  ({results[-1][3]:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        record("packed row = documents", lambda: check_packing(device, torch.bfloat16))

        def bf16_tracks_fp32():
            fp32, _ = train(workdir, "fp32", one, "model.dtype=float32", "trainer.max_steps=20")
            bf16, _ = train(workdir, "bf16", one, "model.dtype=bfloat16", "trainer.max_steps=20")
            gap = largest_relative_gap(bf16, fp32)
            return gap < 0.02 and bf16[19] < bf16[
                0
            ], f"loss {bf16[0]:.3f} -> {bf16[19]:.3f}, largest gap to fp32 {gap:.2%}"

        record("bf16 compute tracks fp32", bf16_tracks_fp32)

        def fsdp_matches_one_device():
            # in fp32: sharding must not change the numbers (in bf16, FSDP2 casts the parameters where one device
            # autocasts, a 1.9% loss gap over 10 steps on an H200 that says nothing about the sharding)
            fp32 = "model.dtype=float32"
            single, _ = train(workdir, "single", one, fp32, "trainer.max_steps=10")
            sharded, seconds = train(workdir, "sharded", many, *many_devices, fp32, "trainer.max_steps=10")
            gap = largest_relative_gap(sharded, single)
            return (
                gap < 1e-3,
                f"{gpus} processes vs 1, fp32: largest loss gap {gap:.2e} over 10 steps ({seconds:.0f} s)",
            )

        record("FSDP = one device", fsdp_matches_one_device)

        def grpo_and_dpo_steps():
            grpo, grpo_s = train(
                workdir, "grpo", one, "stage=grpo", "trainer.max_steps=2", "stage.sampling.max_new_tokens=64"
            )
            pairs = pairs_file(workdir / "pairs.jsonl")
            dpo, dpo_s = train(
                workdir,
                "dpo",
                many,
                *many_devices,
                "stage=dpo",
                "stage.pairs=file",
                f"data.train={pairs}",
                "data.val=null",
                "heldout.num_prompts=0",
                "trainer.max_steps=2",
            )
            return len(grpo) == 2 and len(
                dpo
            ) == 2, f"GRPO 2 steps in {grpo_s:.0f} s, DPO (FSDP) 2 steps in {dpo_s:.0f} s"

        record("GRPO and DPO steps", grpo_and_dpo_steps)

        def throughput():
            size = (
                ["model.config.hidden_size=256", "data.max_sequence_length=512"]
                if args.cpu
                else [
                    *(f"model.config.{key}={value}" for key, value in HUNDRED_M.items()),
                    "data.max_sequence_length=2048",
                    "data.batch_size=16",
                    "data.micro_batch_size=8",
                ]
            )
            bench = subprocess.run(
                [sys.executable, str(SCRIPTS / "bench_midtrain.py"), *size, "--steps", "5"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found = dict(re.findall(r"^(tokens/s|model FLOPs util|model)\s+(.+)$", bench, re.M))
            return (
                True,
                f"{found.get('model', '?')}: {found.get('tokens/s', '?')} tokens/s, "
                f"MFU {found.get('model FLOPs util', '?')}",
            )

        record("mid-training tokens/s, MFU", throughput)

        def grpo_with_vllm():
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                return True, "skipped: vLLM is not installed (pip install -e '.[vllm]', or scripts/install_vllm_cpu.sh)"
            common = [
                "stage=grpo",
                "rollout=vllm",
                "trainer.max_steps=3",
                "stage.sampling.max_new_tokens=64",
                "stage.rollout_correction=token_truncate",
                "heldout.num_prompts=0",
            ]
            lines = []
            for name, hardware in (("one device", [one]), ("FSDP", [many, *many_devices])):
                train(workdir, f"vllm_{name}", *hardware, *common)
                with (workdir / f"vllm_{name}" / "csv" / "metrics.csv").open() as handle:
                    rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
                sync = max(float(row["train/weight_sync_s"]) for row in rows)
                gap = max(float(row["train/rollout_logprob_diff"]) for row in rows)
                lines.append(f"{name}: sync <= {sync:.2f} s, |Δ log p| <= {gap:.1e}")
            return True, "; ".join(lines)

        record("GRPO with vLLM", grpo_with_vllm)

        def lora_in_bf16():
            grpo, _ = train(
                workdir, "lora_grpo", one, "stage=grpo", "trainer.max_steps=2", "stage.sampling.max_new_tokens=64",
                "stage.beta=0.04", "model.lora.rank=16",
            )  # fmt: skip
            model_dir = workdir / "model_100m"
            size = {"hidden_size": 256} if args.cpu else HUNDRED_M
            tokenizer = build_synthetic_tokenizer()
            config = {**DEMO_MODEL, **size}
            load_hf_model(ModelConfig(config=config), ChatFormat(tokenizer), param_dtype=torch.float32).save_pretrained(
                model_dir
            )
            tokenizer.save_pretrained(model_dir)
            bench = subprocess.run(
                [sys.executable, str(SCRIPTS / "bench_lora.py"), "--model", str(model_dir), one],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(bench, flush=True)
            ratios = re.findall(r"\| rank \d+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", bench)
            return len(grpo) == 2 and len(ratios) == 2, (
                "GRPO with LoRA and its base as reference: 2 steps; LoRA/full memory, step: "
                + ", ".join(f"{stage} {memory}, {step}" for stage, (memory, step) in zip(("SFT", "GRPO"), ratios))
            )

        record("LoRA in bf16", lora_in_bf16)

    failed = [name for name, ok, _, _ in results if not ok]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
