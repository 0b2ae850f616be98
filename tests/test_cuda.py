"""On CUDA: the same tokens as the CPU float32 path, and ``flexgen bench`` end to end.

Every test here is marked ``gpu`` and skipped without CUDA (tests/conftest.py). The reference
is the engine on the CPU in float32 with every tensor in memory; the CUDA engine, in float32
with TF32 off, must give identical greedy tokens for the same wide random checkpoint whatever the
placement of weights and cache, the attention backend, the schedule and the overlap setting.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen import Policy, load_engine

REPO = Path(__file__).resolve().parents[1]
MODEL = "opt-125m"  # synthetic: seeded N(0, 0.02) weights, no download
PROMPTS = [[2, 100, 200, 300, 400, 500, 600], [2, 7, 8], [2, 1000, 2000, 3000, 4000], [2, 31], [2, 9, 99, 999]]
NEW_TOKENS = 8

PLACEMENTS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (30, 30)}
COMBOS = list(itertools.product(PLACEMENTS, ["gpu", "cpu", "mix"], ["gpu", "cpu"]))

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 matmuls on CUDA (TF32 would round inputs to 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    """A random OPT checkpoint with wide weights (flexgen.testing.reference): its logits have clear
    winners, so CPU and CUDA float32 (different summation orders, ~1e-6 apart) pick the same
    tokens. OPT's own N(0, 0.02) weights leave near-ties that such differences can flip."""
    from flexgen.testing.reference import write_random_checkpoint

    path = tmp_path_factory.mktemp("wide-opt")
    write_random_checkpoint(path, vocab_size=4160, hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                            num_attention_heads=4, max_position_embeddings=128)
    return path


@pytest.fixture(scope="module")
def cpu_reference(wide_checkpoint, tmp_path_factory):
    """Greedy tokens of the CPU float32 engine, every tensor in memory."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, pin_weights=False)
    with load_engine(wide_checkpoint, policy=policy, device="cpu", dtype="float32",
                     offload_dir=tmp_path_factory.mktemp("offload-cpu")) as engine:
        return engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("weights,cache,attention", COMBOS)
def test_cuda_float32_equals_cpu_float32(wide_checkpoint, cpu_reference, tmp_path, weights, cache, attention):
    policy = Policy(
        gpu_batch_size=2, num_gpu_batches=3,
        weights_gpu=PLACEMENTS[weights][0], weights_cpu=PLACEMENTS[weights][1],
        cache_gpu=PLACEMENTS[cache][0], cache_cpu=PLACEMENTS[cache][1],
        act_gpu=PLACEMENTS[cache][0], act_cpu=PLACEMENTS[cache][1],
    )
    with load_engine(wide_checkpoint, policy=policy, plugins={"attention": attention}, device="cuda",
                     dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == cpu_reference


@pytest.mark.parametrize("scheduler,overlap,pin", [("zigzag", False, True), ("row", True, True), ("zigzag", True, False)])
def test_cuda_schedules_and_overlap_equal_cpu(wide_checkpoint, cpu_reference, tmp_path, scheduler, overlap, pin):
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=0, weights_cpu=100, cache_gpu=50, cache_cpu=50,
                    overlap=overlap, pin_weights=pin)
    with load_engine(wide_checkpoint, policy=policy, plugins={"scheduler": scheduler}, device="cuda",
                     dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == cpu_reference


def test_cuda_stats_count_pcie_bytes(tmp_path):
    """Weights on the CPU cross PCIe once per step (zig-zag), whatever the number of GPU batches;
    of the embedding tables only the rows of the step's tokens cross (gathered where they live)."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=0, weights_cpu=100)
    with load_engine(MODEL, policy=policy, device="cuda", dtype="float16", offload_dir=tmp_path) as engine:
        engine.generate(PROMPTS[:4], max_new_tokens=3)
        stats = engine.stats.to_dict()
    spec = engine.spec
    tables = 2 * (spec.vocab_size * spec.word_embed_proj_dim + (spec.max_positions + 2) * spec.hidden_size)
    row = 2 * (spec.word_embed_proj_dim + spec.hidden_size)
    prompt_len = max(map(len, PROMPTS[:4]))
    rows = 4 * (prompt_len + 2)  # 4 sequences: the padded prompt, then 2 decode steps of 1 token
    expected = 3 * (stats["compression"]["weights_stored_bytes"] - tables) + rows * row
    moved = stats["bytes_moved"]["cpu->gpu"]
    assert expected <= moved <= expected * 1.01, (moved, expected)


def _bench(tmp_path, config: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "flexgen.cli", "bench", "--config", str(REPO / "configs" / "bench" / config),
           f"model.synthetic={MODEL}", "data.num_prompts=8", "data.prompt_len=32", "generation.max_new_tokens=4",
           f"output.offload_dir={tmp_path / 'offload'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLEXGEN_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "bench").glob("w*.yaml")))
def test_bench_workloads_run_on_cuda(tmp_path, config):
    """Each workload's policy, on a small model: the bench measures, bounds and prints on CUDA."""
    out = _bench(tmp_path, config, "policy.gpu_batch_size=4", "policy.num_gpu_batches=2")
    for kind in ("prefill", "decode", "total"):
        assert re.search(rf"^  {kind}\s+[\d,.]+\s+[\d,.]+\s+[\d.]+ %", out, re.M), out
    assert "(cuda)" in out  # the profile was measured on this machine's GPU


def test_bench_baseline_hf_all_on_gpu(tmp_path):
    out = _bench(tmp_path, "w1-opt-6.7b-gpu.yaml", "policy.gpu_batch_size=8", "--baseline", "hf")
    assert re.search(r"baseline hf: [\d,.]+ tokens/s total \(batch 8, all weights on cuda", out), out
    assert re.search(r"flexgen / hf = [\d.]+x", out), out


def test_bench_baseline_hf_with_accelerate_offload(tmp_path):
    pytest.importorskip("accelerate")
    out = _bench(tmp_path, "w2-opt-30b-cpu-weights.yaml", "policy.gpu_batch_size=4", "--baseline", "hf")
    assert re.search(r"baseline hf: .*Accelerate offload, modules per tier cpu: \d+", out), out
    assert re.search(r"flexgen / hf = [\d.]+x", out), out


def test_failed_host_registration_leaves_no_cuda_error():
    """Registering memory twice fails; the failure must not surface in the next kernel launch."""
    from flexgen.storage.cpu import register, unregister

    host = torch.empty(1 << 20, dtype=torch.uint8)
    assert register(host)
    try:
        assert not register(host)  # already registered: CUDA refuses and sets its last error
        x = torch.ones(1024, device="cuda")
        torch.cuda.synchronize()
        assert float((x * 2).sum()) == 2048.0  # a launch after the failure raises nothing
    finally:
        unregister(host)


def test_weight_prefetch_does_not_run_ahead_of_compute(tmp_path):
    """Weights streamed from the CPU: the device holds a few layers at a time, never the model."""
    from flexgen.models import opt

    model = "opt-1.3b"
    spec = opt.spec_for_size(model)
    layer_bytes = [sum(opt._numel(w.shape) for w in opt.layer_weights(spec, i)) * 2
                   for i in range(spec.num_model_layers)]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=1, weights_gpu=0, weights_cpu=100)
    with load_engine(model, policy=policy, device="cuda", dtype="float16", offload_dir=tmp_path) as engine:
        engine.generate(PROMPTS[:2], max_new_tokens=2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        engine.generate(PROMPTS[:2], max_new_tokens=4)
        peak = torch.cuda.max_memory_allocated()
    assert peak < 4 * max(layer_bytes) + (64 << 20), (peak, sum(layer_bytes))
