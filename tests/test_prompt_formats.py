"""Prompts from where people keep them: CSV, TSV, Parquet, a saved ``datasets`` dataset, read
with the ``datasets`` library; ``data.text_field`` / ``data.id_field`` name the columns, and a
run on any of them resumes as a ``.jsonl`` one does."""

from __future__ import annotations

import json

import pytest

from flexgen.errors import ConfigError, PromptError
from flexgen.predict.data import read_prompts
from flexgen.predict.run import run_predict
from tests.test_predict import Factory, config, expected_output, read_out

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed (pip install 'flexgen[datasets]')")

ROWS = [{"key": "a", "body": "hello there"}, {"key": "b", "body": "two words"}, {"key": "c", "body": "x"}]


def tok(text):
    return {"input_ids": [2] + [4 + ord(c) % 90 for c in text]}


def write(path, rows):
    """Write ``rows`` in the format ``path``'s suffix (or a folder name ending in /saved) says, through datasets."""
    table = datasets.Dataset.from_list(rows)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        table.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["p.csv", "p.tsv", "p.parquet", "saved"])
def test_every_table_format_reads_the_same_prompts(tmp_path, name):
    path = write(tmp_path / name, ROWS)
    prompts = read_prompts(path, tok, text_field="body", id_field="key")
    assert [(p.id, p.text, p.input_ids) for p in prompts] == [(r["key"], r["body"], tuple(tok(r["body"])["input_ids"]))
                                                              for r in ROWS]
    assert prompts[1].source == f"{path} row 1"
    # without an id column the row index is the id; the .jsonl reader honours the same field names
    assert [p.id for p in read_prompts(path, tok, text_field="body")] == [0, 1, 2]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [(p.id, p.text) for p in read_prompts(jsonl, tok, "body", "key")] == [(p.id, p.text) for p in prompts]


def test_token_ids_column_and_dataset_dict_splits(tmp_path):
    rows = [{"id": 5, "input_ids": [2, 10, 11]}, {"id": 6, "input_ids": [2, 12]}]
    path = write(tmp_path / "ids.parquet", rows)
    assert [(p.id, p.input_ids, p.text) for p in read_prompts(path)] == [(5, (2, 10, 11), None), (6, (2, 12), None)]
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(both))
    assert [p.id for p in read_prompts(both, tok, "body", "key", split="test")] == ["a"]
    with pytest.raises(ConfigError, match="data.split: .* holds the splits train, test; set data.split"):
        read_prompts(both, tok, "body", "key")
    with pytest.raises(ConfigError, match="not 'validation'"):
        read_prompts(both, tok, "body", "key", split="validation")


@pytest.mark.parametrize(
    "rows, fields, error, expected",
    [
        (ROWS, {}, ConfigError, "data.text_field: .* has no column 'text' .*its columns: key, body"),
        (ROWS, {"text_field": "body", "id_field": "nope"}, ConfigError, "data.id_field: .* has no column 'nope'"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], {}, PromptError, "row 1: duplicate id 'a' \\(first in row 0\\)"),
        ([{"id": "a", "text": "x"}, {"id": "b", "text": ""}], {}, PromptError, "row 1: 'text' must be a non-empty string"),
        ([{"id": 1.5, "text": "x"}], {}, PromptError, "row 0: 'id' must be a string or an integer"),
    ],
)
def test_table_mistakes_are_one_line_naming_file_and_row(tmp_path, rows, fields, error, expected):
    path = write(tmp_path / "bad.parquet", rows)
    with pytest.raises(error, match=expected):
        read_prompts(path, tok, **fields)


def test_unreadable_table_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")
    with pytest.raises(ConfigError, match="data.prompts: cannot read .*bad.parquet as parquet"):
        read_prompts(bad)
    with pytest.raises(ConfigError, match="data.prompts: .*empty is not a dataset folder"):
        read_prompts((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_a_table_run_resumes_like_a_jsonl_one(tmp_path):
    rows = [{"name": f"q{i}", "input_ids": list(range(4, 6 + i))} for i in range(5)]
    path = write(tmp_path / "prompts.parquet", rows[:3])
    args = [f"data.prompts={path}", "data.id_field=name"]
    first = run_predict(config(tmp_path, *args), engine_factory=Factory())
    assert first["prompts_generated"] == 3
    write(path, rows)  # two prompts added to the file
    second = run_predict(config(tmp_path, *args), engine_factory=Factory())
    assert (second["prompts_generated"], second["prompts_skipped"]) == (2, 3)
    lines = {line["id"]: line for line in read_out(tmp_path / "out.jsonl")}
    assert sorted(lines) == [r["name"] for r in rows]
    assert all(lines[r["name"]]["output_ids"] == expected_output(r["input_ids"], 3) for r in rows)
