"""Template and loss mask: the sequences the stage trains, built as it builds them, carry no loss on the prompt and
do carry it on the reply's end token (or the model never learns to stop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thinkforge.data.packing import IGNORE_INDEX, TokenSequence
from thinkforge.doctor.findings import Finding
from thinkforge.stages.probe import StageProbe


def marked(tokenizer: Any, sequence: TokenSequence, limit: int = 160) -> str:
    """The sequence's text with every run of tokens that carry loss inside [brackets], cut to its last `limit`
    characters. Runs are decoded whole, so a character split across byte-level tokens stays whole."""
    targets = [False] + [label != IGNORE_INDEX for label in sequence.labels[:-1]]
    parts, start = [], 0
    for end in range(1, len(targets) + 1):
        if end == len(targets) or targets[end] != targets[start]:
            text = tokenizer.decode(list(sequence.input_ids[start:end]), skip_special_tokens=False)
            parts.append(f"[{text}]" if targets[start] else text)
            start = end
    text = "".join(parts).replace("\n", "⏎")
    return "…" + text[-limit:] if len(text) > limit else text


def mask_problems(tokenizer: Any, prompt_ids: Sequence[int], sequence: TokenSequence, end_id: int | None) -> list[str]:
    """What is wrong with one trained sequence: prompt tokens that are targets, or a reply that never ends."""
    targets = [i + 1 for i, label in enumerate(sequence.labels) if label != IGNORE_INDEX]
    problems = []
    if tuple(sequence.input_ids[: len(prompt_ids)]) != tuple(prompt_ids):
        problems.append("the generation prompt is not a prefix of the training text")
    if any(position < len(prompt_ids) for position in targets):
        problems.append("prompt tokens carry loss")
    if not targets:
        problems.append("no token carries loss")
    elif end_id is not None and end_id not in {sequence.input_ids[position] for position in targets}:
        problems.append(
            f"the reply's end token {tokenizer.convert_ids_to_tokens(end_id)!r} is not a target: "
            "the model never learns to stop"
        )
    return problems


def check_template(probe: StageProbe[Any], examples: int = 2) -> Finding:
    tokenizer = probe.tokenizer
    cases = probe.examples(examples)
    if not cases:
        return Finding("template and mask", "skip", "no training example to render")
    problems = sorted(
        {problem for case in cases for problem in mask_problems(tokenizer, case.prompt_ids, case.sequence, case.end_id)}
    )
    example = marked(tokenizer, cases[0].sequence)
    if problems:
        return Finding(
            "template and mask",
            "fail",
            f"{'; '.join(problems)}: {example}",
            "fix the chat template or data.system_prompt so each reply ends with the turn's end token",
        )
    return Finding("template and mask", "pass", f"{len(cases)} examples, targets in []: {example}")
