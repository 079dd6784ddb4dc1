"""Load rows from the synthetic task, jsonl/parquet files or a `datasets` hub name into canonical records.

Stages ask for canonical fields (`prompt`, `completion`, `messages`, `chosen`, ...); `data.fields` maps them to
the source's own column names. A malformed row raises a DataError naming the file, the row and the field — or,
with `data.bad_rows=skip`, is skipped and counted so the run can report what it lost.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinkforge.config import DataConfig
from thinkforge.data import synthetic, synthetic_code, synthetic_tool
from thinkforge.errors import UserError
from thinkforge.rewards.code import CodeTests


class DataError(UserError, ValueError):
    """A row that does not fit the stage's schema; the message names source, row and field."""


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("must be a non-empty string")
    return value


def _answer(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise TypeError("must be a non-empty string or a number")
    return str(value)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise TypeError("must be a non-empty list of {role, content} objects")
    for position, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(f"message {position} needs a string 'role'")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise TypeError(
                f"message {position} has role {message['role']!r}; expected system, user, assistant or tool"
            )
        if not isinstance(message.get("content"), str):
            raise TypeError(f"message {position} needs a string 'content'")
    if value[-1]["role"] != "assistant":
        raise TypeError("must end with an assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in value]


FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "text": _text,
    "prompt": _text,
    "completion": _text,
    "chosen": _text,
    "rejected": _text,
    "answer": _answer,
    "tests": CodeTests.parse,
    "messages": _messages,
}
#: a virtual field: the row's `answer` (math) or, without one, its `tests` (code), as a `thinkforge.rewards` gold
GOLD = "gold"


@dataclass
class Records:
    source: str
    rows: list[dict[str, Any]]
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        lost = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.items())
        return f"{self.source}: {len(self.rows)} rows" + (
            f" ({sum(self.skipped.values())} skipped: {lost})" if lost else ""
        )


def raw_rows(source: str, split: str, data: DataConfig) -> Iterator[tuple[int, Any]]:
    """Yields (row number as a person would count it, raw row); jsonl rows are numbered by line."""
    if source == "synthetic":
        task, count = data.synthetic, data.synthetic.num_train if split == "train" else data.synthetic.num_val
        which = "train" if split == "train" else "test"
        levels = {"min_level": task.min_level, "max_level": task.max_level, "max_number": task.max_number}
        problems: Sequence[synthetic.Problem | synthetic_code.CodeProblem | synthetic_tool.ToolProblem]
        if task.task == "tool":
            problems = synthetic_tool.generate(
                which,
                count,
                min_level=task.min_level,
                max_level=task.max_level,
                answer_only_fraction=task.answer_only_fraction,
                seed=task.seed,
            )
        elif task.task == "code":
            problems = synthetic_code.generate(
                which,
                count,
                **levels,
                buggy_fraction=task.buggy_fraction,
                seed=task.seed,
            )
        else:
            problems = synthetic.generate(
                which,
                count,
                **levels,
                answer_only_fraction=task.answer_only_fraction,
                boxed_fraction=task.boxed_fraction,
                seed=task.seed,
            )
        yield from enumerate((p.as_record() for p in problems), start=1)
        return
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line.rstrip("\r\n"))  # so a column counts within the row
                except json.JSONDecodeError as error:
                    yield line_number, error
        return
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise DataError(f"{source}: no such file")
    import datasets

    if path.suffix == ".parquet":
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        dataset = datasets.load_dataset(source, split=split)
    yield from enumerate(dataset, start=1)


def load_split(data: DataConfig, split: str, required: Sequence[str], optional: Sequence[str] = ()) -> Records:
    """The records of a stage's `train` or `val` split: data.train/train_split or data.val/val_split."""
    source, source_split = (data.train, data.train_split) if split == "train" else (data.val, data.val_split)
    if source is None:
        raise DataError(f"data.{split} is null: this stage needs {split} rows with {', '.join(required)}")
    return load_records(source, source_split, data, required, optional)


def load_records(
    source: str, split: str, data: DataConfig, required: Sequence[str], optional: Sequence[str] = ()
) -> Records:
    """Canonical records with every `required` field checked and every present `optional` field kept."""
    records = Records(source=source, rows=[])
    for row_number, raw in raw_rows(source, split, data):
        try:
            records.rows.append(_canonical(raw, data.fields, required, optional))
        except (TypeError, KeyError) as error:
            message = error.args[0]
            if data.bad_rows == "error":
                raise DataError(
                    f"{source}: row {row_number}: {message} (set data.bad_rows=skip to skip such rows)"
                ) from None
            records.skipped[message.split(":")[0]] += 1
    if not records.rows:
        raise DataError(f"{source}: no usable rows ({records.summary()})")
    return records


def invalid_row(raw: Any) -> str | None:
    """Why a raw row is not a JSON object ("invalid JSON: ... at column 7"), or None when it is one."""
    if isinstance(raw, json.JSONDecodeError):
        return f"invalid JSON: {raw.msg} at column {raw.colno}"
    if not isinstance(raw, Mapping):
        return f"not an object: {type(raw).__name__}"
    return None


def read_objects(path: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(row number, row) of every row of a file or dataset, as they are; the first row that is not an object
    raises a DataError naming the file, row and column."""
    for number, raw in raw_rows(path, "train", DataConfig(train=path)):
        reason = invalid_row(raw)
        if reason:
            raise DataError(f"{path}: row {number}: {reason}")
        yield number, raw


def _canonical(raw: Any, fields: Mapping[str, str], required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    reason = invalid_row(raw)
    if reason:
        raise TypeError(reason)
    record: dict[str, Any] = {}
    for name in (*required, *optional):
        if name == GOLD:
            record[GOLD] = _gold(raw, fields)
            continue
        column = fields.get(name, name)
        if column not in raw or raw[column] is None:
            if name in optional:
                continue
            needed = ", ".join(fields.get(field, field) for field in required if field != GOLD)
            raise KeyError(
                f"field '{name}' (column '{column}'): missing; this stage reads {needed}"
                f"{' and an answer (or tests)' if GOLD in required else ''}, the row has {', '.join(map(str, raw))}"
            )
        try:
            record[name] = FIELD_CHECKS.get(name, lambda value: value)(raw[column])
        except TypeError as error:
            raise TypeError(f"field '{name}' (column '{column}'): {error}") from None
    return record


def _gold(raw: Mapping[str, Any], fields: Mapping[str, str]) -> Any:
    """The row's answer, else its tests: a math row or a coding row."""
    for name in ("answer", "tests"):
        column = fields.get(name, name)
        if raw.get(column) is not None:
            try:
                return FIELD_CHECKS[name](raw[column])
            except TypeError as error:
                raise TypeError(f"field '{name}' (column '{column}'): {error}") from None
    answer, tests = fields.get("answer", "answer"), fields.get("tests", "tests")
    raise KeyError(f"field 'answer' (column '{answer}') or 'tests' (column '{tests}'): missing")
