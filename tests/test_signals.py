"""SIGTERM stops a run as Ctrl-C does: finished blocks kept, one line, exit 143; every rank stops.

Each run is the ``flexgen`` command in its own process (a process group of its own, so a signal
can be sent to all of it), on the tiny checkpoint with one prompt per block and the KV cache on
disk, so that a run lasts long enough to be stopped mid-way and has scratch files to clean up.
After the stop, the same command finishes the job with the lines of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexgen.config import load_config
from flexgen.predict.run import run_predict
from flexgen.predict.writer import leftover_parts, part_path
from tests.cli_driver import said
from tests.test_predict_e2e import read_lines

REPO = Path(__file__).resolve().parents[1]
SLOW = ["policy.gpu_batch_size=1", "policy.cache_gpu=0", "policy.cache_cpu=0", "generation.max_new_tokens=40"]
TWO = ["trainer.devices=2", "trainer.strategy=ddp"]


@pytest.fixture
def workdir(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "input_ids": [2, 5 + i, 6]}) + "\n"
                                                    for i in range(24)))
    (tmp_path / "c.yaml").write_text(
        f"model: {{path: {checkpoint}, dtype: float32}}\ndata: {{prompts: prompts.jsonl}}\n"
        "output: {path: out.jsonl, offload_dir: offload}\ntrainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    return tmp_path


def reference(workdir: Path) -> dict:
    out = workdir / "reference.jsonl"
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        run_predict(load_config("c.yaml", SLOW + [f"output.path={out}"]))
    finally:
        os.chdir(cwd)
    return {k: {**v, "job": None} for k, v in read_lines(out).items()}


def start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FLEXGEN_PLUGINS": "flexgen", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "flexgen.cli", "predict", "--config", "c.yaml", *SLOW, *extra]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not condition():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.communicate()[1]}"


def stopped(proc: subprocess.Popen, seconds: float = 120) -> tuple[int, str]:
    """Exit status and stderr of a run that must stop by itself within ``seconds`` (no hang)."""
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not stop after SIGTERM") from None
    return proc.returncode, err


def scratch_folders(workdir: Path) -> list[str]:
    scratch = workdir / "offload" / "scratch"
    return sorted(p.name for p in scratch.iterdir()) if scratch.exists() else []


def test_sigterm_keeps_finished_blocks_and_says_so(workdir):
    expected = reference(workdir)
    out = workdir / "out.jsonl"
    proc = start(workdir)
    wait_for(lambda: lines_in(out) >= 2 and scratch_folders(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    code, err = stopped(proc)
    assert code == 143, err
    assert said(err) == ["flexgen predict: terminated (SIGTERM); finished outputs are kept, rerun to resume"]
    kept = read_lines(out)  # every line whole
    assert 2 <= len(kept) < len(expected)
    assert scratch_folders(workdir) == []  # the engine closed: its KV-cache files are gone
    again = start(workdir)
    code, err = stopped(again, 300)
    assert code == 0, err
    assert {k: {**v, "job": None} for k, v in read_lines(out).items()} == expected


@pytest.mark.parametrize("target", ["rank 0", pytest.param("every process", marks=pytest.mark.slow)])
def test_sigterm_stops_every_rank_of_a_ddp_run(workdir, target):
    expected = reference(workdir)
    out = workdir / "out.jsonl"
    proc = start(workdir, *TWO)
    wait_for(lambda: lines_in(out) >= 1 and lines_in(part_path(out, 1)) >= 1, proc)
    if target == "rank 0":
        proc.send_signal(signal.SIGTERM)  # what a scheduler does to the job's process
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # what a terminal or a process-group kill does
    code, err = stopped(proc)
    assert code == 143, err
    assert said(err) == ["flexgen predict: terminated (SIGTERM); finished outputs are kept, rerun to resume"]
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-f", f"c.yaml {' '.join(SLOW)}"], capture_output=True, text=True).stdout
    assert leftover.strip() == "", "a rank is still running"
    # the rerun (one process) merges what both ranks kept, removes the killed rank's scratch
    # and finishes the job
    again = start(workdir)
    code, err = stopped(again, 300)
    assert code == 0, err
    assert leftover_parts(out) == [] and scratch_folders(workdir) == []
    assert {k: {**v, "job": None} for k, v in read_lines(out).items()} == expected
