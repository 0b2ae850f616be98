"""The planner and the bench with the Llama family: priced from the family's arithmetic, measured beside HF.

No timing is asserted: what is checked is that a Llama model is priced with its own cache
geometry (KV heads, sliding windows), that ``flexgen policy`` answers for a published Llama
size, and that ``flexgen bench`` runs a Llama checkpoint on the CPU with HF's
``LlamaForCausalLM`` as the baseline, on the very same weights, giving the same tokens.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from flexgen import cli
from flexgen.bench.measure import hf_device_map, hf_model
from flexgen.cli.bench import bench_command
from flexgen.models.checkpoint import HFCheckpoint
from flexgen.models.llama import LLAMA_SIZES
from flexgen.planner.costmodel import Workload, arithmetic, estimate
from flexgen.planner.hardware import get_hardware
from flexgen.policy import Policy
from tests.test_bench import env, tiny_config  # noqa: F401 - env is the bench tests' fixture, shared
from tests.test_llama_math import _hf_model


def test_cache_is_priced_by_kv_heads():
    """llama-3.1-70b caches 8 of its 64 heads: the cost model's cache is 8x smaller than by query heads."""
    spec = LLAMA_SIZES["llama-3.1-70b"]
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=0, weights_cpu=100, cache_gpu=0, cache_cpu=100)
    est = estimate(spec, policy, Workload(128, 16), get_hardware("t4-paper"), memory_only=True)
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 2  # k and v, float16
    expected = spec.num_layers * 2 * 4 * (128 + 16) * per_token
    assert est.memory["cpu"]["cache"] == expected
    assert arithmetic(spec).cache_raw * 8 == 2 * spec.num_heads * spec.head_dim


def test_sliding_window_caps_the_priced_attention():
    """Mistral's 4096-token window: past it, decode attention costs no more, and reads no more cache."""
    spec = LLAMA_SIZES["mistral-7b"]
    unwindowed = dataclasses.replace(spec, sliding_window=None, sliding_layers=())
    policy = Policy(gpu_batch_size=2, num_gpu_batches=1, weights_gpu=100, weights_cpu=0, cache_gpu=0, cache_cpu=100)
    hw = get_hardware("t4-paper")
    windowed = estimate(spec, policy, Workload(8000, 8), hw)
    full = estimate(unwindowed, policy, Workload(8000, 8), hw)
    assert windowed.decode.gpu_flops < full.decode.gpu_flops
    assert windowed.decode.bytes["cpu->gpu"] < full.decode.bytes["cpu->gpu"]
    assert arithmetic(spec).keys(10000) == 4096


def test_policy_answers_for_llama_3_1_70b(capsys):
    rc = cli.main(["policy", "--model", "llama-3.1-70b", "--prompt-len", "512", "--gen-len", "32",
                   "--hardware", "t4-paper", "--gpu-batch-sizes", "8,16", "--num-gpu-batches", "1,2"])
    out = capsys.readouterr().out
    assert rc == 0 and "model: llama-3.1-70b" in out and re.search(r"predicted throughput \S+ token/s", out)


def test_policy_on_an_unknown_size_is_one_line(capsys):
    assert cli.main(["policy", "--model", "llama-9b", "--prompt-len", "8", "--gen-len", "4", "--hardware", "t4-paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model size 'llama-9b'" in err and "llama-3.1-8b" in err and "\n" not in err


def test_bench_runs_llama_beside_hf_with_identical_outputs(env, tmp_path, capsys):
    _, hardware = env
    _hf_model("llama").save_pretrained(tmp_path / "llama")
    config = tiny_config(tmp_path, tmp_path / "llama")
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--baseline", "hf", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "identical outputs for 5/5" in out, out


def test_hf_model_holds_the_engines_weights_and_its_rotary_buffers(tmp_path):
    model = _hf_model("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "q")
    spec = HFCheckpoint(tmp_path / "q").spec
    rebuilt = hf_model(str(tmp_path / "q"), spec, "float32", seed=0)
    assert type(rebuilt).__name__ == "Qwen2ForCausalLM"
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits)


def test_hf_device_map_covers_every_llama_parameter_once():
    spec = LLAMA_SIZES["llama-3.2-1b"]
    device_map = hf_device_map(spec, Policy(weights_gpu=30, weights_cpu=30), "cuda")
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**spec.to_hf_config(), "tie_word_embeddings": False}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    for name, _ in model.named_parameters():
        assert len([m for m in device_map if name.startswith(m + ".")]) == 1, name
    assert set(device_map.values()) == {"cuda:0", "cpu", "disk"}


def test_bench_hf_baseline_with_weights_on_disk_places_the_rotary_buffers(env, tmp_path, capsys):
    """Accelerate's offload needs every tensor placed: the rotary buffers go to the compute device."""
    pytest.importorskip("accelerate")
    _, hardware = env
    _hf_model("mistral", sliding_window=4).save_pretrained(tmp_path / "mistral")
    config = tiny_config(tmp_path, tmp_path / "mistral", weights_gpu=50, weights_cpu=0, num_gpu_batches=1)
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--baseline", "hf", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "Accelerate offload" in out and "identical outputs for 5/5" in out, out


def test_llama_workload_configs_load_and_have_bounds():
    """The Llama-family configs of README's table: valid, and priced by the cost model."""
    from pathlib import Path

    from flexgen.bench.measure import run_bench
    from flexgen.config import load_config

    repo = Path(__file__).resolve().parents[1]
    for path, overrides in [(repo / "configs" / "bench" / "cpu-qwen2.5-0.5b.yaml", []),
                            (repo / "configs" / "llama-3.1-8b-cpu-weights.yaml",
                             ["model.path=null", "model.synthetic=llama-3.1-8b"])]:
        report = run_bench(load_config(path, overrides), hardware="t4-paper", bound_only=True)
        assert report.bound.total and report.bound.total > 0, path
