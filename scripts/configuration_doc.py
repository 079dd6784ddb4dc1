"""Writes docs/configuration.md, every key of every command with its default and the comment the schema gives it,
from the schema dataclasses themselves; `--check` fails when the file is stale (tests/project/test_docs.py runs it).

    python scripts/configuration_doc.py            # rewrite docs/configuration.md
    python scripts/configuration_doc.py --check    # exit 1 if it differs from what the schemas say
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thinkforge.benchmarks import EvalConfig
from thinkforge.config import PipelineConfig, TrainConfig
from thinkforge.stage_configs import STAGE_SCHEMAS

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
FIELD = re.compile(r"^\s{4}(\w+)\s*:")


def field_comments(schema: type) -> dict[str, str]:
    """The comment lines written just above each field in the schema's source (its own class and its bases)."""
    comments: dict[str, str] = {}
    for klass in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        pending: list[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped.lstrip("# ").strip())
                continue
            match = FIELD.match(line)
            if match and pending:
                comments[match.group(1)] = " ".join(pending)
            pending = []
    return comments


def rows(schema: type, prefix: str, instance: Any = None) -> Iterator[tuple[str, str, str]]:
    """(dotted key, default, comment) of every knob, nested schemas expanded with the values their owner gives
    them (`heldout.sampling` is greedy, not `SamplingConfig`'s own defaults)."""
    comments, hints = field_comments(schema), typing.get_type_hints(schema)
    for knob in dataclasses.fields(schema):
        if knob.name.startswith("_"):
            continue
        if instance is not None:
            value = getattr(instance, knob.name)
        elif knob.default_factory is not dataclasses.MISSING:
            value = knob.default_factory()
        else:
            value = knob.default
        key = f"{prefix}{knob.name}"
        if dataclasses.is_dataclass(value):
            yield from rows(type(value), f"{key}.", value)
        elif value == "???" and dataclasses.is_dataclass(hints.get(knob.name)):
            yield from rows(hints[knob.name], f"{key}.")  # a group (model, data, ...): its schema's defaults
        else:
            yield key, "(required)" if value == "???" else f"`{value!r}`", comments.get(knob.name, "")


def table(schema: type, prefix: str = "") -> str:
    lines = ["| key | default | what it is |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {comment} |" for key, default, comment in rows(schema, prefix)]
    return "\n".join(lines)


def document() -> str:
    parts = [
        "# Configuration",
        "",
        "Every key of every command, its default and what it is, generated from the schema dataclasses by",
        "`python scripts/configuration_doc.py` (`tests/project/test_docs.py` fails when this file is stale). A YAML in",
        "`conf/` sets only what differs from these defaults.",
        "",
        "## thinkforge-train and thinkforge-doctor (`thinkforge.config.TrainConfig`)",
        "",
        "`stage.*` depends on the stage; its tables follow.",
        "",
        table(TrainConfig),
    ]
    for name, schema in STAGE_SCHEMAS.items():
        parts += ["", f"### `stage={name}` (`{schema.__module__}.{schema.__name__}`)", "", table(schema, "stage.")]
    parts += ["", "## thinkforge-pipeline (`thinkforge.config.PipelineConfig`)", "", table(PipelineConfig)]
    parts += ["", "## thinkforge-eval (`thinkforge.benchmarks.EvalConfig`)", "", table(EvalConfig), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args()
    text = document()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            sys.exit(f"{DOC} is stale: run python scripts/configuration_doc.py")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
