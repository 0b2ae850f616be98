"""flexgen.kernels.decode_attention: equals scaled_dot_product_attention for every layout, mask, head
grouping, size and cache dtype it takes, declines what it does not take, and is what both built-in
backends use for decode on the CPU (the compute-device one for a float32 cache, CPU delegation for
a float32, float16 or bfloat16 one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from flexgen import Policy, load_engine
from flexgen.attention.cpu import CPUAttention
from flexgen.attention.gpu import GPUAttention
from flexgen.compression.groupwise import Int8Compressor
from flexgen.kernels import decode_attention as kernel
from flexgen.testing.attention import packed_cache

needs_kernel = pytest.mark.skipif(not kernel.available(), reason=f"no kernel: {kernel.KERNEL.unavailable_reason()}")
REPO = Path(__file__).resolve().parents[1]


def _reference(q, k, v, valid):
    h, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != h:
        k, v = k.repeat_interleave(h // kv_heads, dim=1), v.repeat_interleave(h // kv_heads, dim=1)
    mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def _inputs(batch, heads, kv_heads, positions, head_dim, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=g) * head_dim ** -0.5
    if layout == "position-major":  # the engine's (T, B, H, D) cache, a prefix of a longer one
        cache = torch.randn(2, positions + 3, batch, kv_heads, head_dim, generator=g)
        k, v = (c[:positions].permute(1, 2, 0, 3) for c in cache)
    else:
        k, v = torch.randn(2, batch, kv_heads, positions, head_dim, generator=g)
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("layout", ["position-major", "sequence-major"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("positions", [1, 7, 100])
@pytest.mark.parametrize("head_dim", [64, 80, 20])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_sdpa(threads, layout, heads, kv_heads, positions, head_dim, masked):
    batch = 3
    q, k, v = _inputs(batch, heads, kv_heads, positions, head_dim, layout)
    valid = None
    if masked:
        valid = torch.rand(batch, positions, generator=torch.Generator().manual_seed(1)) > 0.3
        valid[:, -1] = True  # the new token always sees itself
    expected = _reference(q, k, v, valid)
    for count in (1, 2):
        torch.set_num_threads(count)
        assert kernel.takes(q, k, v, valid)
        torch.testing.assert_close(kernel.decode_attention(q, k, v, valid), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("query_dtype", ["float32", "cache"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 20)])
def test_a_half_precision_cache_is_read_in_float32(threads, cache_dtype, query_dtype, heads, kv_heads, head_dim):
    """The cache's values widened exactly, every sum in float32: SDPA over the same values in float32,
    rounded to the query's dtype."""
    q, k, v = _inputs(3, heads, kv_heads, 37, head_dim, "position-major")
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    if query_dtype == "cache":
        q = q.to(cache_dtype)
    valid = torch.rand(3, 37, generator=torch.Generator().manual_seed(2)) > 0.3
    valid[:, -1] = True
    expected = _reference(q.float(), k.float(), v.float(), valid).to(q.dtype)
    for count in (1, 2):
        torch.set_num_threads(count)
        assert kernel.takes(q, k, v, valid)
        got = kernel.decode_attention(q, k, v, valid)
        assert got.dtype == q.dtype
        if q.dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:  # one rounding of a float32 result to the query's dtype: at most one unit in the last place apart
            torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-3)


@needs_kernel
def test_a_row_with_nothing_to_attend_is_what_sdpa_gives():
    q, k, v = _inputs(2, 2, 2, 5, 16, "position-major")
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1] = False
    torch.testing.assert_close(kernel.decode_attention(q, k, v, valid), _reference(q, k, v, valid),
                               rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("case", ["keys-and-values-apart", "float64", "two-queries", "ungrouped-heads", "float-mask",
                                  "mask-shape", "strided-d"])
def test_what_it_does_not_take_is_declined(case):
    q, k, v = _inputs(2, 4, 4, 5, 16, "position-major")
    valid = torch.ones(2, 5, dtype=torch.bool)
    if case == "keys-and-values-apart":
        k = k.half()
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "two-queries":
        q = torch.randn(2, 4, 2, 16)
    elif case == "ungrouped-heads":
        q = torch.randn(2, 6, 1, 16)
        k, v = k[:, :4], v[:, :4]
    elif case == "float-mask":
        valid = valid.float()
    elif case == "mask-shape":
        valid = valid[:, :4]
    else:
        k = torch.randn(2, 4, 5, 32)[..., ::2]
    assert not kernel.takes(q, k, v, valid)
    with pytest.raises(ValueError, match="decode_attention"):
        kernel.decode_attention(q, k, v, valid)


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
def test_the_compute_device_backend_decodes_with_it_on_the_cpu(masked):
    q, k, v = _inputs(4, 8, 2, 33, 64, "position-major")
    valid = (torch.arange(33) >= torch.tensor([[0], [5], [9], [0]])) if masked else None
    backend = GPUAttention()
    with profile() as prof:
        out = backend.decode(q, k, v, valid)
    names = {event.name for event in prof.events()}
    assert kernel.PROFILER_NAME in names and not any("scaled_dot_product" in n for n in names)
    torch.testing.assert_close(out, _reference(q, k, v, valid), rtol=1e-5, atol=1e-5)


def _decodes_with_kernel(backend, q, k, v, valid) -> tuple[torch.Tensor, bool]:
    with profile() as prof:
        out = backend.decode(q, k, v, valid)
    return out, kernel.PROFILER_NAME in {event.name for event in prof.events()}


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_delegation_decodes_with_it(cache_dtype):
    """CPU delegation's backend (float32 products, its default) reads a plain cache of any of the
    three dtypes with the kernel; the query arrives in the cache's dtype, as from a GPU."""
    q, k, v = _inputs(4, 8, 2, 33, 64, "position-major")
    q, k, v = q.to(cache_dtype), k.to(cache_dtype), v.to(cache_dtype)
    valid = torch.arange(33) >= torch.tensor([[0], [5], [9], [0]])
    out, used = _decodes_with_kernel(CPUAttention(), q, k, v, valid)
    assert used
    expected = _reference(q.float(), k.float(), v.float(), valid).to(cache_dtype)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2 if cache_dtype != torch.float32 else 1e-5,
                               atol=1e-3 if cache_dtype != torch.float32 else 1e-5)


@needs_kernel
def test_what_the_kernel_does_not_cover_stays_on_the_blocked_path():
    """Products in bfloat16 (the backend's ``dtype`` option), a compressed cache, and a
    half-precision query on the compute-device backend (its SDPA keeps the query's precision)."""
    q, k, v = _inputs(2, 4, 4, 40, 64, "position-major")
    valid = torch.ones(2, 40, dtype=torch.bool)
    assert not _decodes_with_kernel(CPUAttention(dtype="bfloat16"), q, k.bfloat16(), v.bfloat16(), valid)[1]
    packed = packed_cache(k, Int8Compressor()), packed_cache(v, Int8Compressor())
    assert not _decodes_with_kernel(CPUAttention(), q, *packed, valid)[1]
    assert not _decodes_with_kernel(GPUAttention(), q.half(), k.half(), v.half(), valid)[1]


@needs_kernel
def test_the_run_summary_says_where_decode_attention_runs_on_the_cpu(tiny_checkpoint):
    """Both built-in backends say so where they would use the kernel (float32 products), and
    nothing otherwise; a backend that does not describe itself says nothing."""
    line, cpu = "CPU decode attention: flexgen's kernel", torch.device("cpu")
    assert GPUAttention().describe(cpu, torch.float32) == line and GPUAttention().describe(cpu, torch.bfloat16) is None
    assert GPUAttention().describe(torch.device("cuda", 0), torch.float32) is None
    assert CPUAttention().describe(cpu, torch.float16) == line  # delegated from a float16 GPU run
    assert CPUAttention(dtype="bfloat16").describe(cpu, torch.float32) is None
    with load_engine(tiny_checkpoint[0], policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32") as engine:
        assert engine.stats.attention_kernel == line
        assert engine.stats.to_dict()["attention_kernel"] == line


def test_flexgen_native_kernels_0_turns_every_kernel_off_and_says_so(tmp_path):
    code = ("from flexgen import linear\n"
            "from flexgen.kernels import decode_attention\n"
            "print(decode_attention.available(), linear.few_rows_enabled())\n"
            "print(linear.describe())\n"
            "print(decode_attention.describe())\n")
    env = {**os.environ, "FLEXGEN_NATIVE_KERNELS": "0", "FLEXGEN_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    flags, line, attention_line = done.stdout.strip().splitlines()
    assert flags == "False False"
    assert line.endswith("the few-row kernel is off: turned off by FLEXGEN_NATIVE_KERNELS=0")
    assert attention_line == "CPU decode attention: PyTorch (flexgen's kernel is off: turned off by FLEXGEN_NATIVE_KERNELS=0)"
    assert not (tmp_path / "kernels").exists()  # nothing was built


def test_a_bad_flexgen_native_kernels_stops_the_cli_in_one_line_before_any_work(tmp_path):
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "FLEXGEN_NATIVE_KERNELS": "maybe", "FLEXGEN_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "flexgen", "predict", "--config", str(REPO / "configs/quickstart.yaml"),
                           f"output.path={out}"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("FLEXGEN_NATIVE_KERNELS='maybe': expected 1 or 0 (on or off)")
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # checked before the quickstart's model was made or loaded
