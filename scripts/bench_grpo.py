"""One GRPO configuration's step time, split into generation and training, with tokens/s, fill ratio and MFU.

    python scripts/bench_grpo.py                                  # the demo's tiny model on the synthetic task
    python scripts/bench_grpo.py stage.sampling.num_samples=4 stage.sampling.max_new_tokens=64 --steps 5
    python scripts/bench_grpo.py --engines hf,vllm                # the same steps with each engine, side by side
    python scripts/bench_grpo.py --engines vllm,vllm_server --threads 1 rollout.vllm_server.cpus=1 \
        stage.max_staleness=1 stage.rollout_correction=token_truncate  # a server sampling while the trainer trains

Arguments are Hydra overrides of `thinkforge-train stage=grpo` (conf/train.yaml). The stage runs as training
runs it (Lightning, the configured rollout engine, the stage's own micro-batches); a callback times each step.
`--engines` runs the configuration once per engine (`rollout=<engine>`) in this process, the HF engine first
(vLLM's side effects on the process come after it), and prints the step times with their ratio. MFU counts
the training pass only, at 6·N FLOPs per trained token (attention left out, so it is a lower bound), against this
machine's matmul peak. The trainer waits for its rollouts `generation_s` of each step (its idle share); the engine
samples `sampling_s` of it (in the background with a server and stage.max_staleness >= 1) and idles the rest;
`weight sync` is the push and its check.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from bench_midtrain import matmul_peak_flops
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from thinkforge.backbone import compute_dtype
from thinkforge.cli import config_dir
from thinkforge.console import quiet_console
from thinkforge.stage_configs import register_configs
from thinkforge.training import run_stage


@dataclass
class StepRecord:
    seconds: float
    metrics: dict[str, float]
    #: from this step's start to the next one's (what a background sampling overlaps)
    period: float = 0.0


@dataclass
class StepTimer(Callback):
    """Wall time of every training step (generation, scoring and optimisation) and the metrics it logged."""

    steps: list[StepRecord] = field(default_factory=list)
    started: float = 0.0
    parameters: int = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.steps:
            self.steps[-1].period = now - self.started
        self.started = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self.started
        self.steps.append(StepRecord(seconds, {k: float(v) for k, v in trainer.callback_metrics.items()}))
        self.parameters = sum(p.numel() for p in module.policy.parameters())


@dataclass
class GRPOBench:
    step_s: float
    generation_s: float
    sampling_s: float
    weight_sync_s: float
    trainer_idle_share: float
    engine_idle_share: float
    training_s: float
    generated_tokens_per_s: float
    trained_tokens_per_s: float
    fill_ratio: float
    mfu: float

    def lines(self) -> list[str]:
        return [
            f"step              {self.step_s:.2f} s (median)",
            f"generation        {self.generation_s:.2f} s, {self.generated_tokens_per_s:,.0f} new tokens/s",
            f"training          {self.training_s:.2f} s, {self.trained_tokens_per_s:,.0f} tokens/s, "
            f"fill ratio {self.fill_ratio:.3f}",
            f"training MFU      {self.mfu:.1%}",
            f"trainer idle      {self.trainer_idle_share:.1%} of the step (waiting for rollouts)",
            f"engine idle       {self.engine_idle_share:.1%} of the step (sampling {self.sampling_s:.2f} s)",
            f"weight sync       {self.weight_sync_s:.3f} s",
        ]


def run_grpo_bench(overrides: list[str], steps: int, warmup: int) -> GRPOBench:
    """Runs `steps + warmup + 1` GRPO steps in a temporary directory and summarises `steps` after the warm-up
    (medians)."""
    register_configs()
    timer = StepTimer()
    with (
        tempfile.TemporaryDirectory() as output_dir,
        initialize_config_dir(config_dir=config_dir(), version_base="1.3"),
    ):
        cfg = compose(
            "train",
            overrides=[
                "stage=grpo",
                f"output_dir={output_dir}",
                f"trainer.max_steps={steps + warmup + 1}",
                "trainer.ckpt_every=100000",
                "heldout.num_prompts=0",
                *overrides,
            ],
        )
        quiet_console()
        run_stage(cfg, callbacks=[timer])
    measured = timer.steps[warmup:-1]  # the last step has no period

    def median(name: str) -> float:
        return statistics.median(step.metrics[name] for step in measured)

    def share(name: str) -> float:
        return statistics.median(step.metrics[name] / step.seconds for step in measured)

    samples = cfg.data.batch_size * cfg.stage.sampling.num_samples
    generated = median("train/completion/mean_length") * samples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_flops(compute_dtype(cfg.model.dtype), device)
    trained_per_s = median("train/tokens_per_s")
    return GRPOBench(
        step_s=statistics.median(step.seconds for step in measured),
        generation_s=median("train/generation_s"),
        sampling_s=median("train/sampling_s"),
        weight_sync_s=median("train/weight_sync_s") if "train/weight_sync_s" in measured[0].metrics else 0.0,
        trainer_idle_share=share("train/generation_s"),
        engine_idle_share=1 - median("train/sampling_s") / statistics.median(step.period for step in measured),
        training_s=median("train/training_s"),
        generated_tokens_per_s=generated / median("train/generation_s"),
        trained_tokens_per_s=trained_per_s,
        fill_ratio=median("train/fill_ratio"),
        mfu=trained_per_s * 6 * timer.parameters / peak,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--engines", default=None, help="comma-separated rollout engines to compare, e.g. hf,vllm")
    parser.add_argument("--threads", type=int, default=None, help="the trainer's torch threads (default: torch's)")
    args, overrides = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device            {'cuda' if torch.cuda.is_available() else 'cpu'} ({torch.get_num_threads()} threads)")
    if args.engines is None:
        print("\n".join(run_grpo_bench(overrides, args.steps, args.warmup).lines()))
        return
    engines = args.engines.split(",")
    benches = {}
    for engine in engines:
        benches[engine] = run_grpo_bench([f"rollout={engine}", *overrides], args.steps, args.warmup)
        print(f"-- rollout={engine}")
        print("\n".join(benches[engine].lines()))
    first = benches[engines[0]]
    for engine in engines[1:]:
        bench = benches[engine]
        print(
            f"{engine} / {engines[0]}: step {first.step_s / bench.step_s:.2f}x faster, "
            f"generation {first.generation_s / bench.generation_s:.2f}x, "
            f"training {first.training_s / bench.training_s:.2f}x"
        )


if __name__ == "__main__":
    main()
