"""The predict path with the real engine on the built-in quickstart checkpoint.

* the quickstart config runs, every prompt once, outputs equal to HF transformers' greedy ones;
* a run killed with SIGKILL after its first block and started again ends with every prompt id
  exactly once and the same lines as an uninterrupted run (greedy), a torn line included.
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
from flexgen.testing.reference import hf_greedy

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture
def env_cache(quickstart_cache, monkeypatch):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    return quickstart_cache


def read_lines(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {line["id"]: line for line in lines}


def test_quickstart_matches_hf_greedy(env_cache, tmp_path):
    from transformers import AutoTokenizer, OPTForCausalLM

    out = tmp_path / "q.jsonl"
    cfg = load_config(QUICKSTART, [f"output.path={out}", "trainer.enable_progress_bar=false"])
    summary = run_predict(cfg)
    lines = read_lines(out)
    prompts = [json.loads(line) for line in (REPO / "configs" / "quickstart_prompts.jsonl").read_text().splitlines()]
    assert sorted(lines) == sorted(p["id"] for p in prompts)
    assert summary["prompts_generated"] == len(prompts)
    assert json.loads(Path(f"{out}.metrics.json").read_text())["generated_tokens"] == summary["tokens_generated"]

    folder = env_cache / "quickstart-v1"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = OPTForCausalLM.from_pretrained(folder).eval()
    n = cfg.generation.max_new_tokens
    for p in prompts:
        line = lines[p["id"]]
        ids = tokenizer(p["text"])["input_ids"]
        assert line["input_ids"] == ids
        reference = hf_greedy(model, [ids], n)[0]  # past </s> too: the stop is applied below
        if 2 in reference:  # the quickstart stops after </s>
            reference = reference[: reference.index(2) + 1]
        assert line["output_ids"] == reference, p["id"]
        assert line["text"] == tokenizer.decode(line["output_ids"], skip_special_tokens=True)


def test_kill_9_and_resume_gives_every_prompt_once(env_cache, tmp_path):
    overrides = ["policy.gpu_batch_size=1", "policy.num_gpu_batches=1", "generation.max_new_tokens=48", "generation.stop=null",
                 "trainer.enable_progress_bar=false"]
    reference = tmp_path / "reference.jsonl"
    run_predict(load_config(QUICKSTART, overrides + [f"output.path={reference}"]))
    expected = read_lines(reference)

    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "flexgen.cli", "predict", "--config", str(QUICKSTART), *overrides, f"output.path={out}"]
    env = {**os.environ, "FLEXGEN_CACHE": str(env_cache)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = out.read_bytes()
    assert 1 <= written.count(b"\n") < len(expected), "the run should have been killed mid-way"
    # and as if the kill had cut a line in half
    out.write_bytes(written + b'{"id": "torn", "input_ids": [2, 3')

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torn line" in result.stderr
    assert read_lines(out) == expected


def test_stop_token_ends_each_output(env_cache, tmp_path):
    out = tmp_path / "stop.jsonl"
    run_predict(load_config(QUICKSTART, [f"output.path={out}", "generation.stop=2", "generation.max_new_tokens=40",
                                         "trainer.enable_progress_bar=false"]))
    lines = read_lines(out)
    assert any(line["output_ids"][-1] == 2 for line in lines.values())
    for line in lines.values():
        assert 2 not in line["output_ids"][:-1]


def test_txt_prompts_get_line_numbers_as_ids(env_cache, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Throughput is\n\nDisk is slow but large,\nThe policy says\n")
    out = tmp_path / "txt.jsonl"
    run_predict(load_config(QUICKSTART, [f"data.prompts={prompts}", f"output.path={out}",
                                         "generation.max_new_tokens=4", "trainer.enable_progress_bar=false"]))
    lines = read_lines(out)
    assert sorted(lines) == [1, 3, 4]
    assert all(len(line["output_ids"]) == 4 and isinstance(line["text"], str) for line in lines.values())


WORKLOADS = sorted(p for p in (REPO / "configs").glob("opt-*.yaml"))


@pytest.mark.parametrize("config_path", WORKLOADS, ids=lambda p: p.stem)
def test_named_workload_runs_shrunk(env_cache, tmp_path, config_path):
    """Each named workload's policy and plugins, on the quickstart model, CPU, a few tokens."""
    out = tmp_path / "w.jsonl"
    cfg = load_config(config_path, [
        "model.path=builtin:quickstart", "model.dtype=float32", "data.num_prompts=5", "data.prompt_len=6",
        "generation.max_new_tokens=3", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        f"output.path={out}", f"output.offload_dir={tmp_path / 'offload'}", "policy.pin_weights=false",
    ])
    summary = run_predict(cfg)
    assert sorted(read_lines(out)) == [0, 1, 2, 3, 4]
    assert summary["policy"] == {**load_config(config_path).to_policy().to_dict(), "pin_weights": False}
