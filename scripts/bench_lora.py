"""Peak memory and step time with and without LoRA, on the same model, data and steps, side by side.

    thinkforge-data smollm2 && python scripts/bench_lora.py                # SmolLM2-135M-Instruct, SFT and GRPO
    python scripts/bench_lora.py --model /path/to/hf_dir --steps 6 --rank 16

Each (stage, LoRA) cell runs in its own process, so its peak memory is its own (on CPU the process's peak resident
memory, ru_maxrss; on a GPU the most memory torch allocated there): the model, its gradients and AdamW state,
GRPO's KL reference (a second copy without LoRA; the adapter switched off with it), activations and the rollout
engine. The step time is the median over the steps after the first, from Lightning's fit in that process. Times and
memory depend on the machine; the ratios are what carries over.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = {
    "sft": ["stage=sft", "data.max_sequence_length=256", "data.batch_size=8", "data.micro_batch_size=4"],
    "grpo (beta=0.04)": [
        "stage=grpo",
        "stage.beta=0.04",
        "stage.sampling.num_samples=4",
        "stage.sampling.max_new_tokens=32",
        "stage.answer_extraction=lenient",
        "data.batch_size=4",
        "data.micro_batch_size=2",
    ],
}


def child(overrides: list[str]) -> None:
    """One run in this process; prints its median step time and peak memory as JSON."""
    import torch
    from bench_grpo import StepTimer
    from hydra import compose, initialize_config_dir

    from thinkforge.cli import config_dir
    from thinkforge.console import quiet_console
    from thinkforge.stage_configs import register_configs
    from thinkforge.training import run_stage

    register_configs()
    with tempfile.TemporaryDirectory() as output, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"output_dir={output}"])
        timer = StepTimer()
        quiet_console()
        run_stage(cfg, callbacks=[timer])
    steps = [record.seconds for record in timer.steps[1:]]
    if torch.cuda.is_available():
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": statistics.median(steps), "peak_mib": peak_mib}))


def run_cell(overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path.home() / ".cache/thinkforge/SmolLM2-135M-Instruct"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell, e.g. hardware=gpu")
    args = parser.parse_args()
    common = [
        f"model.name_or_path={args.model}",
        "model.config=null",
        f"trainer.max_steps={args.steps}",
        "trainer.val_every=1000",
        "trainer.ckpt_every=1000",
        "heldout.num_prompts=0",
        "data.val=null",
        "logger=csv",
        *args.overrides,
    ]
    started = time.perf_counter()
    print(f"| stage | LoRA | peak memory (MiB) | step (s) | memory LoRA/full | step LoRA/full |  ({args.model})")
    print("|---|---|---|---|---|---|")
    for stage, overrides in STAGES.items():
        full = run_cell([*common, *overrides])
        lora = run_cell([*common, *overrides, f"model.lora.rank={args.rank}"])
        print(f"| {stage} | off | {full['peak_mib']:.0f} | {full['step_s']:.2f} | | |")
        print(
            f"| {stage} | rank {args.rank} | {lora['peak_mib']:.0f} | {lora['step_s']:.2f} "
            f"| {lora['peak_mib'] / full['peak_mib']:.2f} | {lora['step_s'] / full['step_s']:.2f} |"
        )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
