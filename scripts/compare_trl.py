"""thinkforge against TRL, side by side in one process, on the same model, tokenizer, prompts and settings.

    pip install trl
    python scripts/compare_trl.py                  # GRPO: 8 MATH-500 prompts x 4 samples x 64 new tokens
    python scripts/compare_trl.py --steps 5 --benchmarks ../shared/data/benchmarks

The model is a randomly initialised Qwen2 of about 25M parameters with a 15K byte-level BPE vocabulary trained on
the benchmark texts, saved once and loaded by path on both sides (so it never emits EOS and both generate the full
64 tokens). Both sample with HF `generate`, fp32, no KL (beta 0), one optimizer step per generation round, the
token-level (DAPO) loss, and the same strict math-accuracy reward. Each side's step is timed by a callback from
its step's start (generation included) to its end; the first `--warmup` steps are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_grpo import run_grpo_bench
from thinkforge.backbone import load_hf_model
from thinkforge.config import ModelConfig
from thinkforge.rewards.math import math_accuracy_many
from thinkforge.tokenizer import train_chat_tokenizer

MODEL = {
    "model_type": "qwen2", "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096, "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
VOCAB_SIZE = 15000


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_model(benchmarks: Path, directory: Path) -> None:
    """The shared starting checkpoint: tokenizer trained on the benchmarks' texts, weights from a fixed seed."""
    math500 = read_jsonl(benchmarks / "math500.jsonl")
    gsm8k = read_jsonl(benchmarks / "gsm8k_test.jsonl")
    corpus = [row["problem"] + "\n" + row["solution"] for row in math500] + [row["question"] + "\n" + row["answer"] for row in gsm8k]
    tokenizer = train_chat_tokenizer(corpus, VOCAB_SIZE)
    model = load_hf_model(ModelConfig(config=dict(MODEL), init_seed=0, dtype="float32"), tokenizer, param_dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"model             {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")


def write_prompts(benchmarks: Path, path: Path, count: int) -> None:
    rows = read_jsonl(benchmarks / "math500.jsonl")[:count]
    path.write_text("".join(json.dumps({"prompt": row["problem"], "answer": row["answer"]}) + "\n" for row in rows))


def grpo_overrides(model_dir: Path, prompts: Path, args: argparse.Namespace) -> list[str]:
    return [
        "model=pretrained", f"model.name_or_path={model_dir}", "model.dtype=float32",
        "data=jsonl", f"data.train={prompts}", "data.val=null", "data.max_length=1024",
        f"data.batch_size={args.prompts}", f"data.micro_batch_size={args.prompts}",
        f"stage.group_size={args.samples}", f"stage.max_completion_length={args.new_tokens}",
        "stage.dynamic_sampling=false", "stage.beta=0.0", "stage.loss_type=dapo", "stage.num_iterations=1",
        "stage.epsilon_high=0.2", "stage.reward={math_accuracy: {weight: 1.0}}",
        "optim.warmup_steps=0", "optim.lr=1e-6",
    ]


def trl_grpo(model_dir: Path, prompts: Path, args: argparse.Namespace) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.started)

    def accuracy(completions: list, answer: list[str], **_) -> list[float]:
        return math_accuracy_many([c[0]["content"] for c in completions], answer)

    rows = read_jsonl(prompts)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
            max_steps=args.steps + args.warmup, per_device_train_batch_size=args.prompts * args.samples,
            num_generations=args.samples, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
            beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-6, warmup_steps=0, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=str(model_dir), reward_funcs=accuracy, args=config, train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer],
        )
        trainer.train()
    return timer.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        build_model(args.benchmarks, work_dir / "model")
        write_prompts(args.benchmarks, work_dir / "prompts.jsonl", args.prompts * (args.steps + args.warmup))
        ours = run_grpo_bench(grpo_overrides(work_dir / "model", work_dir / "prompts.jsonl", args), args.steps, args.warmup)
        theirs = statistics.median(trl_grpo(work_dir / "model", work_dir / "prompts.jsonl", args))
    print(f"GRPO step: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up")
    print("thinkforge:\n  " + "\n  ".join(ours.lines()))
    print(f"TRL GRPOTrainer   {theirs:.2f} s (median)")
    print(f"ratio             thinkforge step = {ours.step_s / theirs:.2f} x TRL's ({theirs / ours.step_s:.2f}x faster)")


if __name__ == "__main__":
    main()
