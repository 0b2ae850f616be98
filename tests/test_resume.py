"""A resume is the same job or it is refused; a user's file is never destroyed.

The predict path with the fake engine of tests/test_predict.py (the job rules do not depend on
the engine), plus two command lines in their own process: a full disk under the output and under
the offload folder (a file size limit, RLIMIT_FSIZE, stands in for the full disk).
What tests/test_user_mistakes.py checks for every refusal (one line, exit 2, nothing changed) is
not repeated here; these tests check what happens when a run is allowed to go on.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen.errors import ConfigError
from flexgen.predict.job import job_path
from flexgen.predict.resolve import plan_run
from flexgen.predict.run import run_predict
from flexgen.predict.writer import part_path
from tests.cli_driver import said
from tests.test_predict import Factory, config, expected_output, read_out, write_prompts

REPO = Path(__file__).resolve().parents[1]


def finished(tmp_path: Path, *extra: str) -> bytes:
    """Run the job of ``config(tmp_path, *extra)`` to the end; the output's bytes."""
    run_predict(config(tmp_path, *extra), engine_factory=Factory())
    return (tmp_path / "out.jsonl").read_bytes()


def test_each_line_carries_its_job_and_prompt(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "t", "text": "hello"}\n{"id": "i", "input_ids": [4, 5]}\n')
    tokenizer = type("Tok", (), {"__call__": lambda self, text: {"input_ids": [2, *map(ord, text)]},
                                 "decode": lambda self, ids, skip_special_tokens=True: "x"})()
    import flexgen.predict.resolve as run

    original = run.load_tokenizer
    run.load_tokenizer = lambda cfg, model_dir: tokenizer
    try:
        run_predict(config(tmp_path), engine_factory=Factory())
    finally:
        run.load_tokenizer = original
    lines = {line["id"]: line for line in read_out(tmp_path / "out.jsonl")}
    job = json.loads(job_path(tmp_path / "out.jsonl").read_text())
    assert lines["t"]["prompt"] == "hello" and "prompt" not in lines["i"]
    assert lines["t"]["job"] == lines["i"]["job"] == job["fingerprint"]
    assert job["settings"]["generation.max_new_tokens"] == 3 and job["settings"]["model.weights"].startswith("synthetic")


def test_policy_placement_and_attention_may_change_on_resume(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    full = finished(tmp_path)
    lines = full.splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_bytes(b"".join(lines[:3]))
    factory = Factory()
    summary = run_predict(config(tmp_path, "policy.gpu_batch_size=3", "policy.num_gpu_batches=2", "policy.weights_gpu=0",
                                 "policy.weights_cpu=100", "plugins.attention=cpu", "plugins.scheduler=row"),
                          engine_factory=factory)
    assert summary["prompts_skipped"] == 3 and summary["prompts_generated"] == 4
    assert sorted(map(json.dumps, read_out(tmp_path / "out.jsonl"))) == sorted(map(json.dumps, map(json.loads, lines)))


def test_added_prompts_are_generated_and_removed_ones_reported(tmp_path, caplog):
    rows = write_prompts(tmp_path / "prompts.jsonl", n=5)
    finished(tmp_path)
    before = (tmp_path / "out.jsonl").read_bytes()
    # p0 removed, p5 and p6 added
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]) +
                                            "".join(json.dumps(r) + "\n" for r in write_rows(5, 2)))
    factory = Factory()
    with caplog.at_level(logging.WARNING, logger="flexgen"):
        summary = run_predict(config(tmp_path), engine_factory=factory)
    assert summary["prompts_generated"] == 2 and summary["prompts_skipped"] == 4
    assert (tmp_path / "out.jsonl").read_bytes().startswith(before)  # appended to, nothing rewritten
    assert sorted(line["id"] for line in read_out(tmp_path / "out.jsonl")) == [f"p{i}" for i in range(7)]
    notes = [r.getMessage() for r in caplog.records if "not among the prompts" in r.getMessage()]
    assert len(notes) == 1 and "1 line(s)" in notes[0] and "'p0'" in notes[0]


def write_rows(start: int, n: int) -> list[dict]:
    return [{"id": f"p{i}", "input_ids": list(range(4, 4 + 1 + (i * 5) % 9))} for i in range(start, start + n)]


def test_a_changed_job_is_refused_and_restart_starts_afresh(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    before = finished(tmp_path)
    changed = ("generation.max_new_tokens=4", "generation.max_new_tokens=4")
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens=3 \(this run: 4\); rerun with the same"):
        run_predict(config(tmp_path, changed[0]), engine_factory=Factory(forbid=True))
    assert (tmp_path / "out.jsonl").read_bytes() == before
    part_path(tmp_path / "out.jsonl", 1).write_bytes(before.splitlines(keepends=True)[0])  # an old part file too
    factory = Factory()
    summary = run_predict(config(tmp_path, changed[1]), engine_factory=factory, restart=True)
    assert summary["prompts_generated"] == 7 and summary["prompts_skipped"] == 0
    lines = read_out(tmp_path / "out.jsonl")
    assert sorted(line["id"] for line in lines) == [f"p{i}" for i in range(7)]
    assert all(line["output_ids"] == expected_output(line["input_ids"], 4) for line in lines)
    assert not part_path(tmp_path / "out.jsonl", 1).exists()
    recorded = json.loads(job_path(tmp_path / "out.jsonl").read_text())
    assert recorded["settings"]["generation.max_new_tokens"] == 4 and recorded["fingerprint"] == lines[0]["job"]
    run_predict(config(tmp_path, changed[1]), engine_factory=Factory(forbid=True))  # and resumes as that job


@pytest.mark.parametrize("trouble, message", [
    ("no job", "line 1 carries no job fingerprint"),
    ("two jobs", r"mixes the lines of two jobs \(line 1 and line 2\)"),
    ("part of another job", "out.jsonl.rank2 was generated with"),
])
def test_lines_that_cannot_be_trusted_are_refused(tmp_path, trouble, message):
    write_prompts(tmp_path / "prompts.jsonl")
    before = finished(tmp_path)
    lines = before.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    if trouble == "no job":
        old = json.loads(lines[0])
        del old["job"]
        out.write_bytes((json.dumps(old) + "\n").encode() + b"".join(lines[1:]))
    elif trouble == "two jobs":
        other = {**json.loads(lines[1]), "job": "0123456789abcdef"}
        out.write_bytes(lines[0] + (json.dumps(other) + "\n").encode())
    else:
        out.write_bytes(b"".join(lines[:2]))
        other = {**json.loads(lines[3]), "job": "0123456789abcdef"}
        part_path(out, 2).write_text(json.dumps(other) + "\n")
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=message):
        run_predict(config(tmp_path), engine_factory=Factory(forbid=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == snapshot


def test_our_own_torn_first_write_is_cut_but_only_beside_our_job_file(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    plan = plan_run(config(tmp_path))
    line = json.dumps({"id": "p1", "input_ids": [4], "output_ids": [1, 2, 3], "job": plan.job.fingerprint})
    out.write_text(line[:25])  # killed during the very first write
    with pytest.raises(ConfigError, match="line 1 is not a flexgen output line"):
        run_predict(config(tmp_path), engine_factory=Factory(forbid=True))
    assert out.read_text() == line[:25]
    from flexgen.predict.job import write_job_file

    write_job_file(out, plan.job)  # written by the run before its first append
    summary = run_predict(config(tmp_path), engine_factory=Factory())
    assert summary["prompts_generated"] == 7 and len(read_out(out)) == 7


def test_no_job_file_is_left_by_a_run_that_wrote_nothing(tmp_path):
    from flexgen.errors import CheckpointError

    write_prompts(tmp_path / "prompts.jsonl")

    def broken(model, **kwargs):
        raise CheckpointError("model.path: weights are truncated")

    with pytest.raises(CheckpointError):
        run_predict(config(tmp_path), engine_factory=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


# --------------------------------------------------------------------------- a full disk


def limited(max_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def write_workdir(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "input_ids": [2, 5 + i, 6]}) + "\n"
                                                    for i in range(6)))
    (tmp_path / "c.yaml").write_text(
        f"model: {{path: {checkpoint}, dtype: float32}}\ndata: {{prompts: prompts.jsonl}}\n"
        "generation: {max_new_tokens: 3}\npolicy: {gpu_batch_size: 2}\n"
        "output: {path: out.jsonl, offload_dir: offload}\ntrainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )


def cli(tmp_path: Path, *argv: str, limit: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FLEXGEN_PLUGINS": "flexgen", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flexgen.cli", "predict", "--config", "c.yaml", *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(limit) if limit else None)


def in_process(tmp_path: Path) -> None:
    from flexgen.config import load_config

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_predict(load_config("c.yaml"))
    finally:
        os.chdir(cwd)


def test_a_full_disk_is_one_line_and_the_output_keeps_its_lines(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    write_workdir(tmp_path, checkpoint)
    in_process(tmp_path)
    out = tmp_path / "out.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]))  # a run killed after its first block
    (tmp_path / "out.jsonl.metrics.json").unlink()
    before = out.read_bytes()
    result = cli(tmp_path, limit=len(before) + 40)  # the next block does not fit
    assert result.returncode == 2, result.stderr
    assert len(said(result.stderr)) == 1 and "output.path: cannot write to" in result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert out.read_bytes() == before  # not half a block
    in_process(tmp_path)  # room again: the run resumes
    assert sorted(json.loads(x)["id"] for x in out.read_bytes().splitlines()) == list(range(6))

    # the offload folder full while converting weights for the disk tier
    result = cli(tmp_path, "policy.weights_gpu=0", "output.path=disk.jsonl", limit=20_000)
    assert result.returncode == 2, result.stderr
    assert len(said(result.stderr)) == 1 and "output.offload_dir: cannot write" in result.stderr
    assert not (tmp_path / "disk.jsonl").exists()
