"""The policy search: it fits every capped tier, it beats hand-written policies in its own model,
its memory and byte estimates match what the engine does, and ``flexgen policy`` speaks clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flexgen.cli import main
from flexgen.planner.costmodel import estimate
from flexgen.errors import PolicyError
from flexgen.planner.hardware import KiB, MiB, PRESETS, save_hardware
from flexgen.models.opt import OPTSpec, spec_for_size
from flexgen.planner.optimizer import MARGINS, auto_policy, violations, weight_edges
from flexgen.policy import Policy, split_by_percent

from tests.test_costmodel import FAKE_CPU, FAKE_GPU

SMALL_GRID = dict(gpu_batch_sizes=(1, 4, 16, 64), num_gpu_batches=(1, 2, 4))


def test_chosen_policy_fits_every_capped_tier():
    spec = spec_for_size("opt-6.7b")
    for caps in ({"gpu_memory": "8GiB"}, {"gpu_memory": "4GiB", "cpu_memory": "12GiB"},
                 {"gpu_memory": "2GiB", "cpu_memory": "4GiB", "disk_memory": "64GiB"}):
        hw = FAKE_GPU.with_caps(**caps)
        choice = auto_policy(spec, 256, 16, hw, **SMALL_GRID)
        assert not violations(choice.estimate, hw)
        for tier in ("gpu", "cpu", "disk"):
            assert choice.estimate.peak(tier) <= MARGINS[tier] * getattr(hw, f"{tier}_memory")


def test_shared_memory_counts_gpu_and_cpu_together():
    hw = FAKE_CPU.with_caps(gpu_memory="6GiB", cpu_memory="6GiB")
    choice = auto_policy(spec_for_size("opt-2.7b"), 64, 8, hw, **SMALL_GRID)
    est = choice.estimate
    assert est.peak("gpu") + est.peak("cpu") <= MARGINS["cpu"] * hw.cpu_memory


def test_auto_beats_hand_written_policies_in_its_own_model():
    spec, hw = spec_for_size("opt-13b"), PRESETS["h200"].with_caps(gpu_memory="24GiB")
    choice = auto_policy(spec, 512, 32, hw, num_prompts=256)
    hand = [Policy(g, k, w, 100 - w, c, 100 - c, 100, 0) for g in (8, 32, 64) for k in (1, 4) for w in (0, 30, 60)
            for c in (0, 50)]
    for policy in hand:
        for attention in ("gpu", "cpu"):
            est = estimate(spec, policy, (512, 32, 256), hw, attention=attention)
            if not violations(est, hw):
                assert choice.predicted_throughput >= 0.999 * est.predicted_throughput, (policy, attention)


def test_nothing_fits_is_a_policy_error():
    hw = FAKE_GPU.with_caps(gpu_memory="64MiB", cpu_memory="64MiB", disk_memory="1GiB")
    with pytest.raises(PolicyError, match="no policy fits opt-6.7b"):
        auto_policy(spec_for_size("opt-6.7b"), 64, 8, hw, **SMALL_GRID)


def test_num_prompts_caps_the_block():
    choice = auto_policy(spec_for_size("opt-1.3b"), 64, 8, FAKE_GPU, num_prompts=6, **SMALL_GRID)
    assert choice.policy.gpu_batch_size <= 6
    assert choice.estimate.generated_tokens == 6 * 8


def test_whole_cache_goes_to_the_cpu_when_only_all_of_it_fits():
    """With CPU attention, a cache partly on disk needs host buffers for the fetched prefixes;
    they vanish when every unit is on the CPU, so all units can fit where all but one do not.
    FlexGen's fp16 OPT-30B policy on the paper's machine is such a case (pinning costs no RAM)."""
    hw = PRESETS["t4-paper"]
    choice = auto_policy(spec_for_size("opt-30b"), 512, 32, hw, attentions=("cpu",), weight_compressions=("none",),
                         cache_compressions=("none",), gpu_batch_sizes=(48,), num_gpu_batches=(3,))
    p = choice.policy
    assert (p.weights_gpu, p.weights_cpu, p.cache_gpu, p.cache_cpu) == (20, 80, 0, 100)
    assert p.pin_weights
    assert not violations(choice.estimate, hw)


def test_pinned_policies_are_the_only_ones_searched_when_pinned_copies_are_faster():
    hw = FAKE_GPU.with_caps(gpu_memory="4GiB", cpu_memory="12GiB")
    assert auto_policy(spec_for_size("opt-6.7b"), 256, 16, hw, **SMALL_GRID).policy.pin_weights
    # a profile whose pageable copies are faster: not pinning is priced, and wins
    fast_pageable = dataclasses.replace(hw, h2d_pageable_bandwidth=2 * hw.h2d_bandwidth,
                                        d2h_pageable_bandwidth=2 * hw.d2h_bandwidth)
    assert not auto_policy(spec_for_size("opt-6.7b"), 256, 16, fast_pageable, **SMALL_GRID).policy.pin_weights


def test_weight_edges_realise_distinct_placements():
    spec = spec_for_size("opt-30b")
    edges = weight_edges(spec, "none", "float16")
    assert edges[0] == 0 and edges[-1] == 100 and edges == sorted(edges)
    from flexgen.models import opt

    sizes = [w.shape[0] * (w.shape[1] if len(w.shape) > 1 else 1) for w in opt.layer_weights(spec, 1)]
    placements = {tuple(split_by_percent(sizes, {"gpu": e, "cpu": 100 - e, "disk": 0})) for e in edges}
    assert len(placements) >= 5  # q, k, v, out of an attention layer move one at a time


# --------------------------------------------------------------------------- against the engine


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    """The folder of conftest's tiny HF checkpoint."""
    return tiny_checkpoint[0]


def _run_engine(path, policy, plugins, offload, prompts=None, s=12, n=4):
    from flexgen import load_engine

    engine = load_engine(path, policy=policy, plugins=plugins, device="cpu", dtype="float32", offload_dir=offload)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 300, (prompts or policy.block_size, s), generator=g).tolist()
        engine.generate(ids, max_new_tokens=n)
        return engine.stats.to_dict()
    finally:
        engine.close()


@pytest.mark.parametrize("policy,plugins", [
    (Policy(2, 2, 30, 40, 50, 20, 100, 0), {"attention": "gpu"}),
    (Policy(2, 3, 0, 0, 0, 0, 0, 100), {"attention": "gpu"}),
    (Policy(3, 2, 50, 50, 0, 100, 100, 0), {"attention": "cpu"}),
    (Policy(2, 2, 50, 0, 50, 0, 100, 0), {"attention": "gpu", "weight_compressor": "int4", "cache_compressor": "int4"}),
])
def test_bytes_and_memory_match_the_engine(checkpoint, tmp_path, policy, plugins):
    spec = OPTSpec.from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    stats = _run_engine(checkpoint, policy, plugins, tmp_path)
    est = estimate(spec, policy, (12, 4), FAKE_CPU, attention=plugins["attention"],
                   weight_compression=plugins.get("weight_compressor"), cache_compression=plugins.get("cache_compressor"),
                   dtype="float32")
    for link, moved in stats["bytes_moved"].items():
        assert est.prefill.bytes[link] + est.decode.bytes[link] == pytest.approx(moved), link
    for tier, peak in stats["peak_memory"].items():
        resident = sum(est.memory[tier][k] for k in ("weights", "cache", "act"))
        # the engine samples its peak between steps, when parked activations are one token long
        assert peak <= est.peak(tier)
        assert resident - est.memory[tier]["act"] <= peak <= resident + 1, tier


def test_chosen_policy_runs_under_caps_without_exceeding_them(checkpoint, tmp_path):
    spec = OPTSpec.from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    hw = dataclasses.replace(FAKE_CPU, gpu_memory=300 * KiB, cpu_memory=900 * KiB, disk_memory=64 * MiB)
    choice = auto_policy(spec, 12, 4, hw, num_prompts=8, dtype="float32", gpu_batch_sizes=(1, 2, 4, 8),
                         num_gpu_batches=(1, 2))
    policy = choice.policy
    assert policy.weights_gpu < 100  # the caps bite: the weights (~0.6 MiB) do not fit the "GPU"
    stats = _run_engine(checkpoint, policy, choice.plugins, tmp_path, prompts=8)
    peak = stats["peak_memory"]
    assert peak["gpu"] <= hw.gpu_memory and peak["disk"] <= hw.disk_memory
    assert peak["gpu"] + peak["cpu"] <= hw.cpu_memory  # one memory without CUDA
    assert stats["generated_tokens"] == 8 * 4


# --------------------------------------------------------------------------- CLI


def test_cli_prints_policy_and_bound(capsys):
    rc = main(["policy", "--model", "opt-30b", "--prompt-len", "512", "--gen-len", "32", "--hardware", "t4-paper",
               "--gpu-batch-sizes", "16,48", "--num-gpu-batches", "1,3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "policy: gpu_batch_size=" in out and "predicted throughput" in out and "bound" in out
    assert "gpu  peak" in out and "config:" in out


def test_cli_json(capsys, tmp_path):
    hw_file = tmp_path / "hw.yaml"
    save_hardware(PRESETS["h200"], hw_file)
    rc = main(["policy", "--model", "opt-13b", "--prompt-len", "512", "--gen-len", "32", "--hardware", str(hw_file),
               "--gpu-memory", "24GiB", "--num-gpu-batches", "1,2", "--gpu-batch-sizes", "8,32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    Policy.from_dict(out["policy"])
    assert out["capacity"]["gpu"] == 24 << 30
    assert out["estimate"]["peak_memory"]["gpu"] <= 0.9 * (24 << 30)
    assert set(out["plugins"]) == {"attention", "weight_compressor", "cache_compressor", "scheduler"}
    assert out["predicted_throughput"] > 0 and out["estimate"]["decode"]["bottleneck"]


def test_cli_reads_a_checkpoint_dir(checkpoint, capsys):
    rc = main(["policy", "--model", str(checkpoint), "--prompt-len", "8", "--gen-len", "4", "--hardware", "t4-paper",
               "--gpu-batch-sizes", "1,2", "--num-gpu-batches", "1", "--compression", "none"])
    assert rc == 0
    assert "policy:" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--model", "opt-7b"], "unknown model size 'opt-7b'"),
    (["--model", "opt-125m", "--hardware", "missing.yaml"], "missing.yaml"),
    (["--model", "opt-125m", "--hardware", "t4-paper", "--gpu-memory", "24XB"], "hardware.gpu_memory"),
    (["--model", "opt-125m", "--hardware", "t4-paper", "--prompt-len", "2045"], "positions"),
    (["--model", "opt-125m", "--hardware", "t4-paper", "--compression", "zip"], "--compression"),
    (["--model", "opt-125m", "--prompt-len", "abc"], "argument --prompt-len: invalid int value"),
    (["--hardware", "t4-paper"], "the following arguments are required: --model"),
    (["--model", "opt-66b", "--hardware", "t4-paper", "--cpu-memory", "1GiB", "--disk-memory", "1GiB",
      "--gpu-batch-sizes", "1", "--num-gpu-batches", "1"], "no policy fits"),
])
def test_cli_errors_are_one_line(capsys, args, message):
    argv = ["policy", "--prompt-len", "16", "--gen-len", "8", *args]
    if "--prompt-len" in args:
        argv = ["policy", "--gen-len", "8", *args]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- on a GPU (skipped without CUDA)


@pytest.mark.gpu
def test_chosen_policy_never_exceeds_a_capped_gpu(tmp_path, monkeypatch):
    """Plan for a 1 GiB GPU, run it, and read the CUDA allocator's peak."""
    from flexgen import load_engine
    from flexgen.planner.hardware import measure_hardware

    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path / "cache"))
    cap = 1 << 30
    hw = measure_hardware("cuda", quick=True).with_caps(gpu_memory=cap)
    spec = spec_for_size("opt-1.3b")  # 2.6 GB of fp16 weights: must offload
    choice = auto_policy(spec, 128, 8, hw, num_prompts=32, gpu_batch_sizes=(4, 8, 16, 32), num_gpu_batches=(1, 2))
    assert choice.policy.weights_gpu < 100
    engine = load_engine("opt-1.3b", policy=choice.policy, plugins=choice.plugins, device="cuda", dtype="float16",
                         offload_dir=tmp_path / "offload")
    try:
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(0)
        engine.generate(torch.randint(4, 50000, (32, 128), generator=g).tolist(), max_new_tokens=8)
        peak = torch.cuda.max_memory_allocated()
    finally:
        engine.close()
    assert peak <= cap, f"peak {peak} > cap {cap}; estimate {choice.estimate.peak('gpu')}"


def test_cli_grid_prices_hand_written_policies(capsys):
    from flexgen.planner.optimizer import hand_written_grid

    assert len(hand_written_grid()) >= 12
    rc = main(["policy", "--model", "opt-13b", "--prompt-len", "512", "--gen-len", "32", "--hardware", "h200",
               "--gpu-memory", "24GiB", "--num-gpu-batches", "1,4", "--gpu-batch-sizes", "8,32,64", "--grid", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["grid"]) == len(hand_written_grid())
    best = max(g["predicted_throughput"] for g in out["grid"] if g["fits"])
    assert out["predicted_throughput"] >= 0.999 * best


def test_without_cuda_host_weights_need_no_fetch_buffers():
    """On one memory, weights in the CPU tier are used in place while disk ones are read into
    memory: a small "GPU" cap must still find the all-CPU placement (it once gave up)."""
    hw = FAKE_CPU.with_caps(gpu_memory="200MiB")
    choice = auto_policy(spec_for_size("opt-125m"), 32, 8, hw, dtype="float32", **SMALL_GRID)
    assert choice.policy.weights_gpu < 100
    assert not violations(choice.estimate, hw)
