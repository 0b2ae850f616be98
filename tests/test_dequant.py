"""Group-wise dequantisation (issue 12): one pass per tensor, equal to the reference.

The reference is written out here plainly (unpack every code, ``code * scale + min`` in float32,
rounded once to the output dtype), independent of the library's blocked torch path and of
its Triton kernel. Each test runs on every available device: on the CPU through the torch
path, on CUDA (``gpu`` marker) through the Triton kernel when Triton is installed. Tolerance:
equal up to one unit in the last place of the output dtype (a fused multiply-add may round
once where the reference rounds twice; float32 and float16 outputs agree exactly on the CPU).

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernel itself on CPU tensors; that test
runs wherever Triton is installed, GPU or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexgen.compression import dequant
from flexgen.compression.groupwise import GroupwiseQuantizer, Int4Compressor, Int8Compressor

REPO = Path(__file__).resolve().parents[1]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 256), (3, 5, 67), (33, 1), (4, 2, 3, 80), (7, 130)]
COMPRESSORS = {
    "int4-g64": lambda: Int4Compressor(),
    "int8-g64": lambda: Int8Compressor(),
    "int4-g7": lambda: Int4Compressor(group_size=7),
    "int8-g5": lambda: Int8Compressor(group_size=5),
    "int4-axis0": lambda: Int4Compressor(group_size=16, axis=0),
}


def reference_dequantize(q: GroupwiseQuantizer, parts, shape, dtype) -> torch.Tensor:
    """Every code unpacked, then ``code * scale + min`` in float32, rounded once to ``dtype``."""
    axis = q.axis % len(shape)
    data = parts["data"].movedim(axis, -1)
    length = shape[axis]
    if q.bits == 4:
        codes = torch.stack([data & 0x0F, data >> 4], dim=-1).flatten(-2)[..., :length]
    else:
        codes = data
    groups = parts["scale"].shape[axis]
    pad = groups * q.group_size - length
    codes = F.pad(codes.float(), (0, pad)).unflatten(-1, (groups, q.group_size))
    scale = parts["scale"].movedim(axis, -1).float()[..., None]
    low = parts["min"].movedim(axis, -1).float()[..., None]
    out = (codes * scale + low).flatten(-2)[..., :length]
    return out.to(dtype).movedim(-1, axis)


def assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    eps = torch.finfo(expected.dtype).eps
    scale = expected.float().abs().amax().item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=eps, atol=eps * scale)


def _skip_without(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_decompress_equals_reference(device, name, shape, dtype) -> None:
    _skip_without(device)
    q = COMPRESSORS[name]()
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    parts = q.compress(x)
    expected = reference_dequantize(q, parts, shape, dtype)
    got = q.decompress(parts, shape, dtype)
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device and got.is_contiguous()
    if device == "cpu":
        assert torch.equal(got, expected)
    else:
        assert_within_one_ulp(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int4-g64", "int8-g64", "int4-g7"])
def test_decompress_into_reused_buffer_of_any_float_dtype(device, name) -> None:
    """What a hot loop does: one buffer, written again and again, float32 or the tensor's dtype."""
    _skip_without(device)
    q = COMPRESSORS[name]()
    shape = (48, 200)
    for out_dtype in OUT_DTYPES:
        out = torch.full(shape, float("nan"), dtype=out_dtype, device=device)
        pointer = out.data_ptr()
        for seed in range(2):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.float16).to(device)
            parts = q.compress(x)
            returned = q.decompress_into(parts, out, torch.float16)
            assert returned is out and out.data_ptr() == pointer
            expected = reference_dequantize(q, parts, shape, out_dtype)
            if device == "cpu":
                assert torch.equal(out, expected)
            else:
                assert_within_one_ulp(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_decompress_into_strided_and_sliced_cache_parts(device) -> None:
    """Cache reads: a prefix and a batch slice of token-major parts, into a strided output view."""
    _skip_without(device)
    q = Int4Compressor()
    cache = torch.randn(9, 3, 2, 80, generator=torch.Generator().manual_seed(1)).to(device)
    parts = q.compress(cache)
    sliced = {name: p[:5, 1:] for name, p in parts.items()}
    expected = reference_dequantize(q, sliced, (5, 2, 2, 80), torch.float32)
    holder = torch.zeros(2, 2, 5, 80, device=device)
    out = holder.permute(2, 0, 1, 3)  # (5, 2, 2, 80), not contiguous
    q.decompress_into(sliced, out, torch.float32)
    if device == "cpu":
        assert torch.equal(out, expected)
    else:
        assert_within_one_ulp(out, expected)


def test_small_blocks_give_the_same_result(monkeypatch) -> None:
    """The CPU path's row blocking (many blocks, partial last block) changes nothing."""
    q = Int4Compressor(group_size=6)
    x = torch.randn(37, 50, generator=torch.Generator().manual_seed(2))
    parts = q.compress(x)
    whole = q.decompress(parts, (37, 50), torch.float16)
    monkeypatch.setattr(dequant, "CPU_BLOCK_ELEMENTS", 100)
    assert torch.equal(q.decompress(parts, (37, 50), torch.float16), whole)
    assert torch.equal(whole, reference_dequantize(q, parts, (37, 50), torch.float16))


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from flexgen.compression import _triton_dequant
    from flexgen.compression.groupwise import Int4Compressor, Int8Compressor
    from tests.test_dequant import reference_dequantize, assert_within_one_ulp
    for q in (Int4Compressor(), Int8Compressor(), Int4Compressor(group_size=7), Int8Compressor(group_size=5)):
        for shape in ((20, 256), (3, 5, 67), (33, 1)):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
            parts = q.compress(x)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                out = torch.empty(shape, dtype=dtype)
                _triton_dequant.dequantize(parts["data"], parts["scale"], parts["min"], out,
                                           bits=q.bits, group_size=q.group_size)
                assert_within_one_ulp(out, reference_dequantize(q, parts, shape, dtype))
    print("triton kernel ok")
    """
)


def test_triton_kernel_in_the_interpreter() -> None:
    """The Triton kernel itself, run by Triton's interpreter on CPU tensors (where Triton is installed)."""
    pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton kernel ok" in result.stdout


@pytest.mark.gpu
def test_cuda_uses_the_triton_kernel_when_installed(monkeypatch) -> None:
    """On CUDA with Triton, decompression goes through the fused kernel, not the torch path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    assert dequant.triton_available()
    q = Int4Compressor()
    parts = q.compress(torch.randn(256, 512, device="cuda"))
    calls = []
    original = dequant.dequantize_torch
    monkeypatch.setattr(dequant, "dequantize_torch", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = q.decompress(parts, (256, 512), torch.float16)
    assert not calls, "the torch path ran on CUDA although Triton is installed"
    assert_within_one_ulp(out, reference_dequantize(q, parts, (256, 512), torch.float16))


@pytest.mark.gpu
def test_a_failing_triton_kernel_falls_back_to_torch_once(monkeypatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q = Int8Compressor()
    parts = q.compress(torch.randn(64, 128, device="cuda"))

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(dequant, "dequantize_triton", broken)
    monkeypatch.setattr(dequant, "_triton_failed", None)
    monkeypatch.setattr(dequant, "_triton_importable", lambda: True)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        out = q.decompress(parts, (64, 128), torch.float32)
    assert torch.equal(out.cpu(), reference_dequantize(q, {k: p.cpu() for k, p in parts.items()}, (64, 128), torch.float32))
    assert not dequant.triton_available()
