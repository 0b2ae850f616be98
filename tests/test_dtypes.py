"""``model.dtype: auto`` and the compute dtype (flexgen/dtypes.py), on fake CPU flags."""

from __future__ import annotations

import pytest
import torch

from flexgen import Policy, dtypes, load_engine
from flexgen.config import load_config

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}
COOPER_LAKE = AVX2 | {"avx512f", "avx512_bf16"}
GRAVITON3 = {"fp", "asimd", "sve", "bf16", "i8mm"}


@pytest.mark.parametrize("flags, expected", [
    (AVX2, "float32"), (SAPPHIRE_RAPIDS, "bfloat16"), (COOPER_LAKE, "bfloat16"), (GRAVITON3, "bfloat16"),
    (set(), "float32"),  # flags unknown (not Linux): the safe choice
])
def test_auto_on_the_cpu(flags, expected):
    assert dtypes.resolve_dtype("auto", "cpu", flags) == expected


def test_auto_on_cuda_stays_float16():
    assert dtypes.resolve_dtype("auto", "cuda", SAPPHIRE_RAPIDS) == "float16"
    assert dtypes.resolve_dtype("auto", "cuda:1", set()) == "float16"


def test_an_explicit_dtype_is_kept():
    assert dtypes.resolve_dtype("float16", "cpu", AVX2) == "float16"


@pytest.mark.parametrize("name, flags, expected", [
    ("float16", AVX2, "float32"),             # no native half precision: computed in float32
    ("bfloat16", AVX2, "float32"),
    ("bfloat16", COOPER_LAKE, "bfloat16"),
    ("float16", COOPER_LAKE, "float32"),      # bf16 alone: not bfloat16, which would drop 3 mantissa bits
    ("float16", SAPPHIRE_RAPIDS, "float16"),  # AVX512-FP16
    ("float32", SAPPHIRE_RAPIDS, "float32"),
    ("auto", AVX2, "float32"),
])
def test_compute_dtype_on_the_cpu(name, flags, expected):
    assert dtypes.compute_dtype(name, "cpu", flags) == expected


def test_compute_dtype_on_cuda_is_the_models():
    assert dtypes.compute_dtype("bfloat16", "cuda", set()) == "bfloat16"
    assert dtypes.compute_dtype("float16", "cuda", set()) == "float16"


def test_describe():
    assert dtypes.describe("float32", "cpu", AVX2) == "float32"
    assert dtypes.describe("bfloat16", "cpu", AVX2) == \
        "bfloat16, computed in float32 (no native bfloat16 matrix instructions on this CPU)"


def test_cpu_flags_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert dtypes.read_cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd bf16\n")
    assert dtypes.native_bf16(dtypes.read_cpu_flags(arm))
    assert dtypes.read_cpu_flags(tmp_path / "missing") == frozenset()


def test_config_default_is_auto_and_resolved_once():
    cfg = load_config(None, ["model.synthetic=opt-125m", "data.num_prompts=1", "data.prompt_len=2"])
    assert cfg.model.dtype == "auto"
    assert cfg.resolve_dtype("cuda") == "float16" and cfg.model.dtype == "float16"


def test_job_fingerprint_records_the_resolved_dtype(tmp_path, monkeypatch):
    """A predict run plans with the dtype auto chose, never with 'auto' (a resume elsewhere compares it)."""
    from flexgen.predict.resolve import plan_run

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(COOPER_LAKE))
    cfg = load_config(None, ["model.synthetic=opt-125m", "data.num_prompts=1", "data.prompt_len=2",
                             "trainer.accelerator=cpu", f"output.path={tmp_path / 'out.jsonl'}"])
    plan = plan_run(cfg)
    assert plan.job.settings["model.dtype"] == "bfloat16" and cfg.model.dtype == "bfloat16"


def small_engine(dtype, policy):
    return load_engine("opt-125m", policy=policy, device="cpu", dtype=dtype, threads=1)


@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=2, pin_weights=False),                                     # all in compute memory
    Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=100, pin_weights=False),     # converted per layer
], ids=["gpu-tier", "cpu-tier"])
def test_half_precision_without_native_support_is_computed_in_float32(policy, monkeypatch):
    """bfloat16 weights on an AVX2 CPU: stored as bfloat16 in the cpu tier, computed in float32.

    Their tokens are float32's on the bfloat16-rounded weights, wherever the weights live."""
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(AVX2))
    prompts = [[2, 100, 200, 300], [2, 7]]
    with small_engine("bfloat16", policy) as engine:
        assert (engine.dtype, engine.compute_dtype) == (torch.bfloat16, torch.float32)
        held = {p.tier: p.parts["data"].dtype for layer in engine.layers for p in layer}
        expected = {"gpu": torch.float32} if policy.weights_gpu == 100 else {"cpu": torch.bfloat16}
        assert held == expected
        out = engine.generate(prompts, max_new_tokens=3)
        assert engine.stats.to_dict()["compute_dtype"] == "float32"
    reference_policy = Policy(gpu_batch_size=2, pin_weights=False)
    with small_engine("bfloat16", reference_policy) as reference:
        assert reference.generate(prompts, max_new_tokens=3) == out


def test_native_bfloat16_computes_in_bfloat16(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(COOPER_LAKE))
    with small_engine("auto", Policy(gpu_batch_size=1, pin_weights=False)) as engine:
        assert (engine.dtype, engine.compute_dtype) == (torch.bfloat16, torch.bfloat16)
        assert len(engine.generate([[2, 5]], max_new_tokens=1)[0]) == 1
