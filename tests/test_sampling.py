"""Sampling independent of batching: a prompt's sampled tokens depend on the seed and that prompt alone.

* engine level: the same prompt with the same key samples the same tokens whatever the block
  size, the other prompts, their order and the placement; another seed or key samples others;
* predict level: a sampled run killed mid-way and resumed with another block geometry (and
  placement) ends with the lines of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flexgen import Policy, load_engine
from flexgen.config import load_config
from flexgen.predict.run import run_predict
from tests.test_predict_e2e import QUICKSTART, read_lines

PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11], [2, 99, 98], [2, 5], [2, 61, 62, 63]]
KEYS = [f"p{i}" for i in range(len(PROMPTS))]
SAMPLE = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.95, seed=11)


def sampled(path, offload, policy, prompts, keys, **overrides):
    with load_engine(path, policy=policy, device="cpu", dtype="float32", offload_dir=offload) as engine:
        return engine.generate(prompts, keys=keys, **{**SAMPLE, **overrides})


def test_a_prompt_samples_the_same_in_any_batch(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    reference = sampled(path, tmp_path, Policy(gpu_batch_size=1), PROMPTS, KEYS)
    geometries = [Policy(gpu_batch_size=4), Policy(gpu_batch_size=2, num_gpu_batches=3),
                  Policy(gpu_batch_size=3, weights_gpu=0, weights_cpu=50, cache_gpu=0, cache_cpu=100)]
    for policy in geometries:
        assert sampled(path, tmp_path, policy, PROMPTS, KEYS) == reference
    order = [4, 0, 5, 2, 1, 3]
    shuffled = sampled(path, tmp_path, Policy(gpu_batch_size=4), [PROMPTS[i] for i in order], [KEYS[i] for i in order])
    assert shuffled == [reference[i] for i in order]
    alone = sampled(path, tmp_path, Policy(gpu_batch_size=2), [PROMPTS[2]], [KEYS[2]])
    assert alone == [reference[2]]
    # the seed and the key are what a prompt's stream is drawn from
    assert sampled(path, tmp_path, Policy(gpu_batch_size=4), PROMPTS, KEYS, seed=12) != reference
    other_keys = sampled(path, tmp_path, Policy(gpu_batch_size=4), PROMPTS, [k + "'" for k in KEYS])
    assert other_keys != reference
    # same key, same tokens: a duplicated prompt under one key samples the same; the default keys
    # (the index in the call) do not depend on the block size either
    twice = sampled(path, tmp_path, Policy(gpu_batch_size=2), [PROMPTS[0]] * 2, ["same", "same"])
    assert twice[0] == twice[1]
    with load_engine(path, policy=Policy(gpu_batch_size=1), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        by_index = e.generate(PROMPTS, **SAMPLE)
    with load_engine(path, policy=Policy(gpu_batch_size=4), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        assert e.generate(PROMPTS, **SAMPLE) == by_index


# --------------------------------------------------------------------------- predict


SAMPLED = ["generation.do_sample=true", "generation.temperature=1.2", "generation.seed=5", "generation.stop=null",
           "generation.max_new_tokens=40", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


@pytest.fixture
def env_cache(quickstart_cache, monkeypatch):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    return quickstart_cache


def test_kill_and_resume_sampled_run_with_another_geometry(env_cache, tmp_path):
    reference = tmp_path / "reference.jsonl"
    run_predict(load_config(QUICKSTART, SAMPLED + ["policy.gpu_batch_size=4", "policy.num_gpu_batches=1",
                                                   f"output.path={reference}"]))
    expected = read_lines(reference)

    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "flexgen.cli", "predict", "--config", str(QUICKSTART), *SAMPLED,
               "policy.gpu_batch_size=1", "policy.num_gpu_batches=1", f"output.path={out}"]
    env = {**os.environ, "FLEXGEN_CACHE": str(env_cache), "FLEXGEN_PLUGINS": "flexgen"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = out.read_bytes().count(b"\n")
    assert 2 <= written < len(expected), "the run should have been killed mid-way"

    # resumed with another block geometry (and placement): the same lines as the uninterrupted run
    resume = command[:-3] + ["policy.gpu_batch_size=3", "policy.num_gpu_batches=2", "policy.cache_gpu=0",
                             "policy.cache_cpu=100", f"output.path={out}"]
    result = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_lines(out) == expected
    assert f"{len(expected) - written} prompts generated ({written} already done)" in result.stdout
