"""thinkforge against TRL, side by side in one process, on the same model, tokenizer, data and settings.

    pip install trl
    python scripts/compare_trl.py                  # GRPO and SFT
    python scripts/compare_trl.py grpo --steps 5 --benchmarks ../shared/data/benchmarks

GRPO: 8 MATH-500 prompts x 4 samples x 64 new tokens per step.
The model is a randomly initialised Qwen2 of about 25M parameters with a 15K byte-level BPE vocabulary trained on
the benchmark texts, saved once and loaded by path on both sides (so it never emits EOS and both generate the full
64 tokens). Both sample with HF `generate`, fp32, no KL (beta 0), one optimizer step per generation round, the
token-level (DAPO) loss, and the same strict math-accuracy reward. Each side's step is timed by a callback from
its step's start (generation included) to its end; the first `--warmup` steps are left out.

SFT: 800 chats (MATH-500 and GSM8K problems with their worked solutions), max length 1024, assistant-only loss.
thinkforge packs conversations into rows, and also runs them unpacked, one per row (padded to its micro-batch's
longest, with and without data.group_by_length), through scripts/bench_midtrain.py with stage=sft; TRL runs padded
and with best-fit-decreasing padding-free packing. Unpacked runs and TRL's padded one take micro-batches of 4 chats.
All count real (non-pad) tokens per second of training steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_grpo import run_grpo_bench
from bench_midtrain import run_causal_bench
from transformers import TrainerCallback

from thinkforge.backbone import load_hf_model
from thinkforge.chat import ChatFormat
from thinkforge.config import ModelConfig
from thinkforge.rewards.math import math_accuracy_many
from thinkforge.tokenizer import train_chat_tokenizer

MODEL = {
    "model_type": "qwen2",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}
VOCAB_SIZE = 15000


class StepTimes(TrainerCallback):
    """Wall time of each TRL training step, from its start (generation included, in GRPO) to its end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, *_, **__) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, *_, **__) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_model(benchmarks: Path, directory: Path) -> None:
    """The shared starting checkpoint: tokenizer trained on the benchmarks' texts, weights from a fixed seed."""
    math500 = read_jsonl(benchmarks / "math500.jsonl")
    gsm8k = read_jsonl(benchmarks / "gsm8k_test.jsonl")
    corpus = [row["problem"] + "\n" + row["solution"] for row in math500] + [
        row["question"] + "\n" + row["answer"] for row in gsm8k
    ]
    tokenizer = train_chat_tokenizer(corpus, VOCAB_SIZE)
    model = load_hf_model(
        ModelConfig(config=dict(MODEL), init_seed=0, dtype="float32"), ChatFormat(tokenizer), param_dtype=torch.float32
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(
        f"model             {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"vocabulary {len(tokenizer)}"
    )


def write_prompts(benchmarks: Path, path: Path, count: int) -> None:
    rows = read_jsonl(benchmarks / "math500.jsonl")[:count]
    path.write_text("".join(json.dumps({"prompt": row["problem"], "answer": row["answer"]}) + "\n" for row in rows))


def grpo_overrides(model_dir: Path, prompts: Path, args: argparse.Namespace) -> list[str]:
    return [
        "model=pretrained",
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "data=jsonl",
        f"data.train={prompts}",
        "data.val=null",
        "data.max_sequence_length=1024",
        f"data.batch_size={args.prompts}",
        f"data.micro_batch_size={args.prompts}",
        f"stage.sampling.num_samples={args.samples}",
        f"stage.sampling.max_new_tokens={args.new_tokens}",
        "stage.dynamic_sampling=false",
        "stage.beta=0.0",
        "stage.aggregation=token_mean",
        "stage.num_iterations=1",
        "stage.epsilon_high=0.2",
        "stage.reward={math_accuracy: {weight: 1.0}}",
        "optim.warmup_steps=0",
        "optim.lr=1e-6",
    ]


def trl_run_settings(output_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """What both TRL trainers are run with here: fp32 on CPU, no logging backends or checkpoints, the same steps."""
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "max_steps": args.steps + args.warmup,
    }


def trl_grpo(model_dir: Path, prompts: Path, args: argparse.Namespace) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def accuracy(completions: list, answer: list[str], **_) -> list[float]:
        return math_accuracy_many([c[0]["content"] for c in completions], answer)

    rows = read_jsonl(prompts)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            **trl_run_settings(output_dir, args),
            per_device_train_batch_size=args.prompts * args.samples,
            num_generations=args.samples,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            learning_rate=1e-6,
            warmup_steps=0,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=accuracy,
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[timer],
        )
        trainer.train()
    return timer.seconds[args.warmup :]


def write_chats(benchmarks: Path, path: Path) -> list[str]:
    rows = [{"prompt": r["problem"], "completion": r["solution"]} for r in read_jsonl(benchmarks / "math500.jsonl")]
    rows += [
        {"prompt": r["question"], "completion": r["answer"]}
        for r in read_jsonl(benchmarks / "gsm8k_test.jsonl")[: 800 - len(rows)]
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [row["completion"] for row in rows]


def sft_overrides(model_dir: Path, chats: Path, *layout: str) -> list[str]:
    return [
        "stage=sft",
        "model=pretrained",
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "data=jsonl",
        f"data.train={chats}",
        "data.val=null",
        "data.max_sequence_length=1024",
        "data.overflow=truncate",
        *layout,
    ]


SFT_LAYOUTS = {
    "packed": ["data.pack=true", "data.batch_size=8", "data.micro_batch_size=2"],
    "unpacked": ["data.pack=false", "data.batch_size=8", "data.micro_batch_size=4"],
    "unpacked, grouped by length": [
        "data.pack=false",
        "data.batch_size=8",
        "data.micro_batch_size=4",
        "data.group_by_length=true",
    ],
}


def trl_sft(model_dir: Path, chats: Path, args: argparse.Namespace, padding_free: bool) -> float:
    """Real tokens per second of TRL SFTTrainer's training steps after the warm-up."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(chats)
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows
        ]
    )
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            **trl_run_settings(output_dir, args),
            max_length=1024,
            assistant_only_loss=True,
            learning_rate=1e-4,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            **(
                {"packing": True, "packing_strategy": "bfd", "padding_free": True, "per_device_train_batch_size": 2}
                if padding_free
                else {"per_device_train_batch_size": 4}
            ),
        )
        trainer = SFTTrainer(
            model=str(model_dir),
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[timer],
        )
        trainer.train()
        tokens = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    return (tokens[-1] - tokens[args.warmup - 1]) / sum(timer.seconds[args.warmup :])


def compare_grpo(work_dir: Path, args: argparse.Namespace) -> None:
    write_prompts(args.benchmarks, work_dir / "prompts.jsonl", args.prompts * (args.steps + args.warmup))
    ours = run_grpo_bench(grpo_overrides(work_dir / "model", work_dir / "prompts.jsonl", args), args.steps, args.warmup)
    theirs = statistics.median(trl_grpo(work_dir / "model", work_dir / "prompts.jsonl", args))
    print(
        f"GRPO step: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print("thinkforge:\n  " + "\n  ".join(ours.lines()))
    print(f"TRL GRPOTrainer   {theirs:.2f} s (median)")
    print(
        f"ratio             thinkforge step = {ours.step_s / theirs:.2f} x TRL's ({theirs / ours.step_s:.2f}x faster)"
    )


def compare_sft(work_dir: Path, args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    replies = write_chats(args.benchmarks, work_dir / "chats.jsonl")
    lengths = sorted(len(ids) for ids in AutoTokenizer.from_pretrained(work_dir / "model")(replies)["input_ids"])
    ours = {
        name: run_causal_bench(
            sft_overrides(work_dir / "model", work_dir / "chats.jsonl", *layout), args.steps, args.warmup
        )
        for name, layout in SFT_LAYOUTS.items()
    }
    padded = trl_sft(work_dir / "model", work_dir / "chats.jsonl", args, padding_free=False)
    packed = trl_sft(work_dir / "model", work_dir / "chats.jsonl", args, padding_free=True)
    print(
        f"SFT: 800 chats (reply tokens: median {lengths[len(lengths) // 2]}, p90 {lengths[len(lengths) * 9 // 10]}), "
        f"max length 1024, assistant-only loss, {args.steps} steps after {args.warmup} warm-up"
    )
    for name, bench in ours.items():
        print(
            f"thinkforge {name:<28} {bench.tokens_per_s:7,.0f} tokens/s, fill ratio {bench.fill_ratio:.3f}, "
            f"MFU {bench.mfu:.1%}"
        )
    print(f"TRL SFTTrainer padded                  {padded:7,.0f} tokens/s")
    print(f"TRL SFTTrainer BFD pad-free            {packed:7,.0f} tokens/s")
    print(
        f"ratio                                  "
        f"packed {ours['packed'].tokens_per_s / max(padded, packed):.2f}x TRL's best; "
        f"unpacked {ours['unpacked'].tokens_per_s / padded:.2f}x TRL padded"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="*", help="grpo and/or sft (default: both)")
    parser.add_argument(
        "--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/benchmarks"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    args.work = args.work or ["grpo", "sft"]
    if set(args.work) - {"grpo", "sft"}:
        parser.error(f"unknown comparison {sorted(set(args.work) - {'grpo', 'sft'})}: choose grpo and/or sft")
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        build_model(args.benchmarks, work_dir / "model")
        if "grpo" in args.work:
            compare_grpo(work_dir, args)
        if "sft" in args.work:
            compare_sft(work_dir, args)


if __name__ == "__main__":
    main()
