"""Decode attention read in blocks (issue 12): same numbers as before, without the copies.

- The blocked CPU decode equals the float32 computation it replaced (whole prefix converted to
  float32, one matmul each way) within float32 rounding: at most 2e-6 absolute difference on
  outputs of magnitude about 1, over float16, bfloat16 and float32 caches, many blocks,
  padding, and the engine's strided views.
- After a warm-up call, a decode call allocates next to nothing: not a float32 copy of the
  prefix (the old path allocated two), nor a decompressed copy of a packed one. The
  allocation counter is torch's profiler; that it sees the old path's copies is checked too,
  so a pass means something.
- A backend that reads a packed cache by decompressing it whole fails the contract check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.attention.blocked import MIN_BLOCK_TOKENS, blocked_decode, plan_blocks
from flexgen.attention.cpu import CPUAttention
from flexgen.attention.gpu import GPUAttention
from flexgen.compression.groupwise import Int4Compressor, Int8Compressor
from flexgen.testing.attention import AttentionBackendContract, cache_views, packed_cache, random_valid
from flexgen.workspace import Workspace

#: How close the blocked decode is to the float32 computation it replaced (outputs are O(1)).
FLOAT32_ROUNDING = 2e-6


def float32_decode(q, k, v, valid) -> torch.Tensor:
    """The CPU decode before issue 12: float32 copies of the whole prefix, then two matmuls."""
    dtype = torch.float32
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))
    scores.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(dtype)
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)


def dequantise_then_attend(q, k: PackedKV, v: PackedKV, valid) -> torch.Tensor:
    """The engine before issue 12 with a compressed cache: the whole prefix decompressed, then attended."""
    return float32_decode(q, k.decompress(), v.decompress(), valid)


def inputs(b, h, t, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=gen) / d**0.5
    k = torch.randn(b, h, t, d, generator=gen).to(dtype)
    v = torch.randn(b, h, t, d, generator=gen).to(dtype)
    valid = random_valid(b, t, gen)
    return q, k, v, valid


def bytes_allocated(fn) -> int:
    """Host bytes allocated by one call of ``fn`` after a warm-up call (torch's profiler)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.key != "[memory]" and e.self_cpu_memory_usage > 0)


# ------------------------------------------------------------------ equal to the old computation


def blocked(block_kib: int, workspace: Workspace | None = None):
    """``blocked_decode`` in float32 with blocks of ``block_kib`` KiB: what ``CPUAttention`` runs
    where the native decode kernel does not take its tensors (a packed cache, ``dtype:
    bfloat16``, no kernel on this machine)."""
    workspace = workspace or Workspace()
    return lambda q, k, v, valid: blocked_decode(q, k, v, valid, compute_dtype=torch.float32,
                                                 block_bytes=block_kib << 10, workspace=workspace)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("block_kib", [1, 64, 8192, None], ids=["blocked-1KiB", "blocked-64KiB", "blocked-8MiB",
                                                               "CPUAttention"])
def test_decode_equals_float32_computation(dtype, block_kib) -> None:
    b, h, t, d = 3, 5, 77, 64
    q, k, v, valid = inputs(b, h, t, d, dtype)
    kv, vv = cache_views(k, v)
    decode = CPUAttention().decode if block_kib is None else blocked(block_kib)
    got = decode(q, kv, vv, valid)
    expected = float32_decode(q, k, v, valid)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert (got - expected).abs().max().item() <= FLOAT32_ROUNDING
    # Unmasked: the same as an all-true mask.
    everything = torch.ones_like(valid)
    unmasked = decode(q, kv, vv, None)
    assert (unmasked - float32_decode(q, k, v, everything)).abs().max().item() <= FLOAT32_ROUNDING


def test_blocks_follow_the_layout() -> None:
    """Position blocks over a (T, B, H, D) cache, sequence blocks over a (B, H, T, D) one."""
    q, k, v, valid = inputs(4, 2, 77, 16, torch.float16)
    token_major = plan_blocks(cache_views(k, v)[0], torch.float32, 1024)
    assert [(b.start, b.stop, p.stop - p.start) for b, p in token_major] == (
        [(0, 4, MIN_BLOCK_TOKENS)] * 9 + [(0, 4, 77 - 9 * MIN_BLOCK_TOKENS)]
    )
    # A whole sequence (2 heads x 77 positions x 16 in float32 = 9856 bytes) fits 16 KiB: 1 per block.
    assert plan_blocks(k, torch.float32, 16 << 10) == [(slice(i, i + 1), slice(0, 77)) for i in range(4)]
    # ... but not 4 KiB: then each sequence is cut in positions too.
    assert plan_blocks(k, torch.float32, 4 << 10)[:2] == [(slice(0, 1), slice(0, 32)), (slice(0, 1), slice(32, 64))]


@pytest.mark.parametrize("layout", ["TBHD", "BHTD"])
def test_many_blocks_in_either_layout(layout) -> None:
    q, k, v, valid = inputs(3, 2, 77, 16, torch.float16)
    kv, vv = cache_views(k, v) if layout == "TBHD" else (k, v)
    loaded: list[tuple[int, ...]] = []

    class Counting(Workspace):
        def empty_like_layout(self, name, like, dtype):
            loaded.append(tuple(like.shape))
            return super().empty_like_layout(name, like, dtype)

    out = blocked_decode(q, kv, vv, valid, compute_dtype=torch.float32, block_bytes=1024, workspace=Counting())
    assert len(loaded) > 4, loaded
    assert (out - float32_decode(q, k, v, valid)).abs().max().item() <= FLOAT32_ROUNDING


def test_bfloat16_option_computes_in_bfloat16() -> None:
    """``dtype: bfloat16`` keeps its meaning: products in bfloat16, close to float32 at bfloat16 precision."""
    q, k, v, valid = inputs(2, 3, 40, 32, torch.bfloat16)
    got = CPUAttention(dtype="bfloat16").decode(q, *cache_views(k, v), valid)
    torch.testing.assert_close(got, float32_decode(q, k, v, valid), rtol=2e-2, atol=1e-2)


def test_packed_decode_equals_dequantise_then_attend() -> None:
    """Within float32 rounding of the dequantised values (the old path rounded them to the cache dtype first)."""
    q, k, v, valid = inputs(2, 3, 50, 64, torch.float32)
    for compressor in (Int4Compressor(), Int8Compressor()):
        pk, pv = packed_cache(k, compressor), packed_cache(v, compressor)
        for attention in (CPUAttention(block_kib=4), GPUAttention()):
            got = attention.decode(q, pk, pv, valid)
            assert (got - dequantise_then_attend(q, pk, pv, valid)).abs().max().item() <= FLOAT32_ROUNDING


# ------------------------------------------------------------------ no copies of the prefix


@pytest.mark.parametrize("path", ["blocked", "CPUAttention"])
def test_decode_allocates_no_copy_of_the_prefix(path) -> None:
    b, h, t, d = 2, 4, 300, 64
    q, k, v, valid = inputs(b, h, t, d, torch.float16)
    kv, vv = cache_views(k, v)
    prefix_float32 = b * h * t * d * 4
    old = bytes_allocated(lambda: float32_decode(q, kv, vv, valid))
    assert old >= 2 * prefix_float32, f"the counter missed the old path's float32 copies ({old} bytes)"
    decode = blocked(16) if path == "blocked" else CPUAttention(block_kib=16).decode
    new = bytes_allocated(lambda: decode(q, kv, vv, valid))
    # What remains: the score rows' softmax (t floats per head) and the output.
    assert new < prefix_float32 / 8, f"decode allocated {new} bytes; the float32 prefix is {prefix_float32}"


@pytest.mark.parametrize("compressor", [Int4Compressor(), Int8Compressor()], ids=["int4", "int8"])
def test_packed_decode_allocates_no_decompressed_prefix(compressor) -> None:
    b, h, t, d = 2, 4, 300, 64
    q, k, v, valid = inputs(b, h, t, d, torch.float16)
    pk, pv = packed_cache(k, compressor), packed_cache(v, compressor)
    prefix = b * h * t * d * 2  # the prefix decompressed to the cache's float16
    old = bytes_allocated(lambda: dequantise_then_attend(q, pk, pv, valid))
    assert old >= 2 * prefix, f"the counter missed the old path's decompressed prefix ({old} bytes)"
    for attention in (CPUAttention(block_kib=16), GPUAttention()):
        new = bytes_allocated(lambda: attention.decode(q, pk, pv, valid))
        assert new < prefix / 4, f"{type(attention).__name__}: decode allocated {new} bytes; the prefix is {prefix}"


def test_workspace_is_reused_across_calls() -> None:
    q, k, v, valid = inputs(2, 2, 60, 32, torch.float16)
    workspace = Workspace()
    decode = blocked(4, workspace)
    decode(q, k, v, valid)
    held = workspace.nbytes()
    assert held > 0
    first = decode(q, k, v, valid)
    second = decode(q, k, v, valid)
    assert workspace.nbytes() == held
    assert torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr(), "the output must not live in the workspace"


# ------------------------------------------------------------------ the contract check has teeth


class WholePrefixReader(AttentionBackend):
    """Declares a packed read but decompresses the whole prefix: what the contract must refuse."""

    reads_packed_cache = True

    def device(self, compute_device: torch.device) -> torch.device:
        return compute_device

    def decode(self, q, k, v, valid):
        if isinstance(k, PackedKV):
            k, v = k.decompress(), v.decompress()
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid[:, None, None, :], scale=1.0)


def test_contract_refuses_a_whole_prefix_reader() -> None:
    contract = AttentionBackendContract()
    contract.packed_long_shape = (1, 2, 64, 16)
    with pytest.raises(AssertionError, match="the whole"):
        contract.test_decode_packed_never_decompresses_the_whole_prefix(WholePrefixReader(), "int4")
    # Its numbers are right: only the whole-prefix read is refused.
    contract.test_decode_packed_matches_dequantised(WholePrefixReader(), "int8", torch.float32, 2, 2, 9, 16)
