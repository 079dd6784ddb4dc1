"""Loading real data: field mapping, and errors that name the file, the row and the field."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config

from thinkforge.config import DataConfig, validate
from thinkforge.data.records import GOLD, DataError, load_records


def data_config(*overrides):
    return validate(compose_config(*overrides)).data


def write_jsonl(path, rows):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_field_mapping_and_numeric_answers(tmp_path):
    path = write_jsonl(tmp_path / "cot.jsonl", [{"problem": "1+1?", "solution": "2", "final": 2.0}])
    data = data_config("data.fields.prompt=problem", "data.fields.completion=solution", "data.fields.answer=final")
    records = load_records(str(path), "train", data, required=("prompt", "completion"), optional=("answer",))
    assert records.rows == [{"prompt": "1+1?", "completion": "2", "answer": "2.0"}]


@pytest.mark.parametrize(
    "bad_row,expected",
    [
        ({"prompt": "q"}, "row 2: field 'completion' (column 'completion'): missing"),
        (
            {"prompt": "q", "completion": 3},
            "row 2: field 'completion' (column 'completion'): must be a non-empty string",
        ),
        ('{"prompt": "q", ', "row 2: invalid JSON"),
        ([1, 2], "row 2: not an object"),
    ],
)
def test_bad_row_is_named_by_file_row_and_field(tmp_path, bad_row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}, bad_row])
    with pytest.raises(DataError) as error:
        load_records(str(path), "train", data_config(), required=("prompt", "completion"))
    assert str(path) in str(error.value) and expected in str(error.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "q"}, {"prompt": "c", "completion": "d"}, "not json"]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    records = load_records(str(path), "train", data_config("data.bad_rows=skip"), required=("prompt", "completion"))
    assert [r["prompt"] for r in records.rows] == ["a", "c"]
    assert sum(records.skipped.values()) == 2
    assert "2 skipped" in records.summary()


def test_messages_are_checked(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: field 'messages'.*role 'robot'"):
        load_records(str(path), "train", data_config(), required=("messages",))


def test_parquet_and_missing_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), path)
    records = load_records(str(path), "train", data_config(), required=("prompt", "completion"))
    assert [r["completion"] for r in records.rows] == ["c1", "c2"]
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "absent.jsonl"), "train", data_config(), required=("prompt",))


def test_synthetic_source_gives_canonical_records():
    records = load_records(
        "synthetic", "val", data_config("data.synthetic.num_val=5"), required=("prompt", "completion", "answer")
    )
    assert len(records) == 5 and all("\\boxed{" in r["completion"] for r in records.rows)


def test_a_row_of_another_shape_names_what_the_stage_reads_and_what_the_row_has(tmp_path):
    """GRPO given SFT's `messages` rows: not just "field 'prompt' missing"."""
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    with pytest.raises(
        DataError, match=r"row 1: .*this stage reads prompt and an answer \(or tests\), the row has messages"
    ):
        load_records(str(path), "train", DataConfig(train=str(path)), required=("prompt", GOLD))
