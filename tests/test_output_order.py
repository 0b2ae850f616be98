"""``output.order: prompts`` rewrites a finished output in the prompts' order; the metrics name
the flexgen version; ``flexgen --version``."""

from __future__ import annotations

import importlib.metadata
import json
import os

import flexgen
from flexgen.cli import main as cli_main
from flexgen.predict.run import run_predict
from tests.test_predict import Factory, config, read_out, write_prompts


def test_prompt_order_once_complete(tmp_path):
    rows = write_prompts(tmp_path / "prompts.jsonl", n=7)
    out = tmp_path / "out.jsonl"
    run_predict(config(tmp_path), engine_factory=Factory())
    in_blocks = [line["id"] for line in read_out(out)]
    file_order = [r["id"] for r in rows]
    assert in_blocks != file_order and sorted(in_blocks) == sorted(file_order), "blocks sort by length"
    os.chmod(out, 0o640)

    # an output finished in block order is put in order by a run that has nothing left to do
    summary = run_predict(config(tmp_path, "output.order=prompts"), engine_factory=Factory(forbid=True))
    assert summary["prompts_skipped"] == 7
    assert [line["id"] for line in read_out(out)] == file_order
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o640), "the rewritten file keeps its permissions"
    assert not [p.name for p in tmp_path.iterdir() if ".reorder-" in p.name]

    # a run that generates ends in order too, prompts added to the file included
    rows = write_prompts(tmp_path / "prompts.jsonl", n=10)
    run_predict(config(tmp_path, "output.order=prompts"), engine_factory=Factory())
    assert [line["id"] for line in read_out(out)] == [r["id"] for r in rows]


def test_metrics_record_the_version_and_cli_prints_it(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", n=3)
    run_predict(config(tmp_path), engine_factory=Factory())
    metrics = json.loads((tmp_path / "out.jsonl.metrics.json").read_text())
    assert metrics["flexgen_version"] == flexgen.__version__ == importlib.metadata.version("flexgen")
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"flexgen {flexgen.__version__}\n"
