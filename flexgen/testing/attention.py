"""Contract of a :class:`flexgen.attention.base.AttentionBackend`.

Every backend must compute ``softmax(q kᵀ + mask) v`` (``q`` already scaled) as a float64
reference does, for random inputs with padding: decode over a cache where ``valid`` is False
at masked positions, and causal prefill where padded keys are hidden. Outputs have the shape
of ``q``, its dtype and its device; the cache is read, never written. Decode also takes the
cache as the engine passes it: (B, H, t, D) strided views of a (T, B, H, D) buffer.

A backend that declares ``accepts_unmasked`` must give the same results with ``valid`` None
(no padding). One that declares ``reads_packed_cache`` receives int4 / int8 caches as
:class:`~flexgen.attention.base.PackedKV` and must equal dequantise-then-attend, without ever
decompressing the whole prefix at once: a recording compressor checks that every piece it
decompresses is smaller than the prefix (``packed_long_shape`` sets the prefix; a backend
whose blocks are larger raises it).

One that declares ``accepts_grouped_kv`` takes ``k`` and ``v`` with fewer heads than ``q``
(grouped-query attention, as Llama's and Mistral's caches hold them), packed or not, and a
sliding ``window`` in prefill; it must equal repeating each KV head for its group of queries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.compression.base import Compressor, PartSpecs
from flexgen.compression.groupwise import Int4Compressor, Int8Compressor
from flexgen.testing._random import fresh_generator, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """float64 ``softmax(q kᵀ, masked) v``; ``allowed`` broadcasts to (B, H, n, t)."""
    scores = q.double() @ k.double().transpose(-1, -2)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


def random_valid(batch: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """(B, t) bool: row 0 all valid, row 1 left-padded, the rest random; every row keeps a key."""
    valid = torch.rand(batch, t, generator=gen) < 0.7
    valid[0] = True
    if batch > 1:
        valid[1] = torch.arange(t) >= t // 2
    valid[:, -1] = True  # the newest token (the query itself in decode) is always valid
    return valid


def cache_views(k: torch.Tensor, v: torch.Tensor, spare: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` (B, H, t, D) as the engine passes them: views of a longer (T, B, H, D) buffer."""
    out = []
    for x in (k, v):
        b, h, t, d = x.shape
        buffer = torch.full((t + spare, b, h, d), float("nan"), dtype=x.dtype, device=x.device)
        buffer[:t] = x.permute(2, 0, 1, 3)
        out.append(buffer[:t].permute(1, 2, 0, 3))
    return out[0], out[1]


class RecordingCompressor(Compressor):
    """Wraps a cache compressor and records the shape of every tensor it decompresses."""

    def __init__(self, inner: Compressor) -> None:
        super().__init__()
        self.inner = inner
        self.decompressed: list[tuple[int, ...]] = []

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        return self.inner.part_specs(shape, dtype)

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner.compress(x)

    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.decompressed.append(tuple(shape))
        return self.inner.decompress(parts, shape, dtype)

    def decompress_into(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, dtype=None) -> torch.Tensor:
        self.decompressed.append(tuple(out.shape))
        return self.inner.decompress_into(parts, out, dtype)


def packed_cache(x: torch.Tensor, compressor: Compressor) -> PackedKV:
    """(B, H, t, D) keys or values compressed as the engine's cache holds them, as a :class:`PackedKV`."""
    b, h, t, d = x.shape
    parts = compressor.compress(x.permute(2, 0, 1, 3).contiguous())
    return PackedKV(parts, compressor, (t, b, h, d), x.dtype)


PACKED_COMPRESSORS = {"int4": Int4Compressor, "int8": Int8Compressor}


class AttentionBackendContract:
    """Subclass as ``Test...`` and implement :meth:`make_attention` (or override ``attention``).

    Attributes a subclass may change:
        compute_device: the engine's compute device, passed to ``attention.device``.
        tolerances: {dtype: (rtol, atol)} against the float64 reference.
        packed_long_shape: (B, H, t, D) of the prefix whose packed read must come in pieces.
    """

    compute_device: str = "cpu"
    packed_long_shape: tuple[int, int, int, int] = (2, 4, 4096, 128)
    tolerances: dict[torch.dtype, tuple[float, float]] = {
        torch.float32: (1e-4, 1e-5),
        torch.float16: (5e-3, 2e-3),
        torch.bfloat16: (2e-2, 1e-2),
    }

    def make_attention(self) -> AttentionBackend:
        """The backend under test."""
        raise NotImplementedError("subclass AttentionBackendContract and implement make_attention()")

    @pytest.fixture
    def attention(self) -> AttentionBackend:
        return self.make_attention()

    def reference_decode(self, attention: AttentionBackend, q, k, v, valid) -> torch.Tensor:
        """The float64 output decode should give; approximate backends override this with their rule."""
        return reference_attention(q.cpu(), k.cpu(), v.cpu(), valid.cpu()[:, None, None, :])

    def _inputs(self, shape_q, shape_kv, dtype, device, gen):
        d = shape_q[-1]
        q = randn(shape_q, gen) / math.sqrt(d)
        k, v = randn(shape_kv, gen), randn(shape_kv, gen)
        return [t.to(dtype=dtype, device=device) for t in (q, k, v)]

    def _check(self, out, expected, like, dtype, seed, rows=None):
        assert tuple(out.shape) == tuple(like.shape), f"output shape {tuple(out.shape)}, expected {tuple(like.shape)}"
        assert out.dtype == like.dtype, f"output dtype {out.dtype}, expected {like.dtype}"
        assert out.device == like.device, f"output on {out.device}, expected {like.device}"
        got = out.cpu().double()
        assert torch.isfinite(got).all(), f"non-finite output (seed {seed})"
        if rows is not None:
            got, expected = got[rows], expected[rows]
        rtol, atol = self.tolerances[dtype]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{m}\n(seed {seed}, {dtype})")

    def test_device_is_a_torch_device(self, attention: AttentionBackend) -> None:
        device = attention.device(torch.device(self.compute_device))
        assert isinstance(device, torch.device)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("b,h,t,d", [(3, 4, 7, 16), (2, 2, 1, 8), (4, 3, 40, 64)])
    def test_decode_matches_reference(self, attention: AttentionBackend, dtype, b, h, t, d) -> None:
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((b, h, 1, d), (b, h, t, d), dtype, device, gen)
        valid = random_valid(b, t, gen).to(device)
        k_before, v_before = k.clone(), v.clone()
        out = attention.decode(q, k, v, valid)
        expected = self.reference_decode(attention, q, k, v, valid)
        self._check(out, expected, q, dtype, seed)
        assert torch.equal(k, k_before) and torch.equal(v, v_before), "decode modified the cache"

    def test_decode_ignores_masked_values(self, attention: AttentionBackend) -> None:
        """Whatever sits at masked positions (stale cache, padding) has no effect."""
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((2, 2, 1, 16), (2, 2, 9, 16), torch.float32, device, gen)
        valid = random_valid(2, 9, gen).to(device)
        out = attention.decode(q, k, v, valid)
        hidden = ~valid[:, None, :, None]
        k2 = k.masked_fill(hidden, 1e4)
        v2 = v.masked_fill(hidden, -1e4)
        out2 = attention.decode(q, k2, v2, valid)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5, msg=lambda m: f"{m}\n(seed {seed})")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("b,h,n,d", [(3, 2, 6, 16), (1, 4, 1, 8), (2, 2, 17, 32)])
    def test_prefill_matches_causal_reference(self, attention: AttentionBackend, dtype, b, h, n, d) -> None:
        gen, seed = fresh_generator()
        device = torch.device(self.compute_device)
        q, k, v = self._inputs((b, h, n, d), (b, h, n, d), dtype, device, gen)
        valid = random_valid(b, n, gen)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed |= torch.eye(n, dtype=torch.bool)[None]
        out = attention.prefill(q, k, v, valid.to(device))
        expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), allowed[:, None])
        # Compare where the query is a real token; padding queries only have to stay finite.
        rows = valid[:, None, :].expand(b, h, n)
        self._check(out, expected, q, dtype, seed, rows=rows)

    # -- the cache as the engine passes it ---------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_decode_reads_strided_cache_views(self, attention: AttentionBackend, dtype) -> None:
        """k, v as (B, H, t, D) views of a (T, B, H, D) buffer (stale values beyond t)."""
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((3, 4, 1, 32), (3, 4, 37, 32), dtype, device, gen)
        valid = random_valid(3, 37, gen).to(device)
        kv, vv = cache_views(k, v)
        out = attention.decode(q, kv, vv, valid)
        self._check(out, self.reference_decode(attention, q, k, v, valid), q, dtype, seed)

    def _skip_unless(self, attention: AttentionBackend, flag: str) -> None:
        if not getattr(attention, flag, False):
            pytest.skip(f"{type(attention).__name__} does not declare {flag}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_decode_without_mask(self, attention: AttentionBackend, dtype) -> None:
        self._skip_unless(attention, "accepts_unmasked")
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((2, 3, 1, 16), (2, 3, 11, 16), dtype, device, gen)
        valid = torch.ones(2, 11, dtype=torch.bool, device=device)
        out = attention.decode(q, *cache_views(k, v), None)
        self._check(out, self.reference_decode(attention, q, k, v, valid), q, dtype, seed)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_prefill_without_mask(self, attention: AttentionBackend, dtype) -> None:
        self._skip_unless(attention, "accepts_unmasked")
        gen, seed = fresh_generator()
        device = torch.device(self.compute_device)
        n = 9
        q, k, v = self._inputs((2, 3, n, 16), (2, 3, n, 16), dtype, device, gen)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        out = attention.prefill(q, k, v, None)
        self._check(out, reference_attention(q.cpu(), k.cpu(), v.cpu(), causal[None, None]), q, dtype, seed)

    # -- a compressed cache read in place ----------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("name", sorted(PACKED_COMPRESSORS))
    @pytest.mark.parametrize("b,h,t,d", [(3, 4, 37, 64), (2, 2, 1, 80), (1, 3, 130, 16)])
    def test_decode_packed_matches_dequantised(self, attention: AttentionBackend, name, dtype, b, h, t, d) -> None:
        """PackedKV k, v give what the same cache, decompressed first, gives (float64 reference)."""
        self._skip_unless(attention, "reads_packed_cache")
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((b, h, 1, d), (b, h, t, d), dtype, device, gen)
        valid = random_valid(b, t, gen).to(device)
        compressor = PACKED_COMPRESSORS[name]()
        pk, pv = packed_cache(k, compressor), packed_cache(v, compressor)
        before = {n: p.clone() for n, p in [*pk.parts.items(), *(("v." + n, p) for n, p in pv.parts.items())]}
        out = attention.decode(q, pk, pv, valid)
        expected = reference_attention(q.cpu(), pk.decompress().cpu(), pv.decompress().cpu(), valid.cpu()[:, None, None, :])
        self._check(out, expected, q, dtype, seed)
        after = {n: p for n, p in [*pk.parts.items(), *(("v." + n, p) for n, p in pv.parts.items())]}
        assert all(torch.equal(before[n], after[n]) for n in before), "decode modified the packed cache"
        if getattr(attention, "accepts_unmasked", False):
            everything = torch.ones(b, t, dtype=torch.bool, device=device)
            expected = reference_attention(q.cpu(), pk.decompress().cpu(), pv.decompress().cpu(), everything.cpu()[:, None, None, :])
            self._check(attention.decode(q, pk, pv, None), expected, q, dtype, seed)

    @pytest.mark.parametrize("name", sorted(PACKED_COMPRESSORS))
    def test_decode_packed_never_decompresses_the_whole_prefix(self, attention: AttentionBackend, name) -> None:
        """Every piece decompressed is smaller than the prefix: no full-precision copy of it exists."""
        self._skip_unless(attention, "reads_packed_cache")
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        b, h, t, d = self.packed_long_shape
        q, k, v = self._inputs((b, h, 1, d), (b, h, t, d), torch.float32, device, gen)
        valid = random_valid(b, t, gen).to(device)
        compressor = RecordingCompressor(PACKED_COMPRESSORS[name]())
        pk, pv = packed_cache(k, compressor), packed_cache(v, compressor)
        out = attention.decode(q, pk, pv, valid)
        pieces = compressor.decompressed
        assert pieces, "decode never decompressed the packed cache through its compressor"
        largest = max(math.prod(s) for s in pieces)
        assert largest < b * h * t * d, (
            f"decode decompressed {largest} values at once: the whole ({t}, {b}, {h}, {d}) prefix"
        )
        covered = sum(s[0] for s in pieces)
        assert covered >= 2 * t, f"the pieces cover {covered} positions, fewer than the keys and values"
        expected = reference_attention(q.cpu(), pk.decompress().cpu(), pv.decompress().cpu(), valid.cpu()[:, None, None, :])
        self._check(out, expected, q, torch.float32, seed)

    # -- grouped-query attention and sliding windows -----------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("b,h,kv_heads,t,d", [(3, 4, 2, 7, 16), (2, 6, 1, 40, 32), (1, 8, 4, 1, 8)])
    def test_decode_grouped_kv_matches_repeated_heads(self, attention: AttentionBackend, dtype, b, h, kv_heads, t,
                                                      d) -> None:
        """Fewer KV heads than query heads, as the engine's cache views: query head i reads KV head
        ``i // (h / kv_heads)`` (HF's ``repeat_kv``); the cache is left as it was."""
        self._skip_unless(attention, "accepts_grouped_kv")
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        q, k, v = self._inputs((b, h, 1, d), (b, kv_heads, t, d), dtype, device, gen)
        valid = random_valid(b, t, gen).to(device)
        kv, vv = cache_views(k, v)
        before = kv.clone(), vv.clone()
        out = attention.decode(q, kv, vv, valid)
        group = h // kv_heads
        expected = self.reference_decode(attention, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         valid)
        self._check(out, expected, q, dtype, seed)
        assert torch.equal(kv, before[0]) and torch.equal(vv, before[1]), "decode modified the cache"
        if getattr(attention, "accepts_unmasked", False):
            everything = torch.ones(b, t, dtype=torch.bool, device=device)
            expected = self.reference_decode(attention, q, k.repeat_interleave(group, 1),
                                             v.repeat_interleave(group, 1), everything)
            self._check(attention.decode(q, kv, vv, None), expected, q, dtype, seed)

    @pytest.mark.parametrize("name", sorted(PACKED_COMPRESSORS))
    def test_decode_grouped_kv_packed(self, attention: AttentionBackend, name) -> None:
        """A packed cache of KV heads, grouped queries: as dequantise, repeat, then attend."""
        self._skip_unless(attention, "accepts_grouped_kv")
        self._skip_unless(attention, "reads_packed_cache")
        gen, seed = fresh_generator()
        device = attention.device(torch.device(self.compute_device))
        b, h, kv_heads, t, d = 2, 6, 2, 37, 32
        q, k, v = self._inputs((b, h, 1, d), (b, kv_heads, t, d), torch.float32, device, gen)
        valid = random_valid(b, t, gen).to(device)
        compressor = PACKED_COMPRESSORS[name]()
        pk, pv = packed_cache(k, compressor), packed_cache(v, compressor)
        out = attention.decode(q, pk, pv, valid)
        group = h // kv_heads
        expected = reference_attention(q.cpu(), pk.decompress().cpu().repeat_interleave(group, 1),
                                       pv.decompress().cpu().repeat_interleave(group, 1), valid.cpu()[:, None, None, :])
        self._check(out, expected, q, torch.float32, seed)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("b,h,kv_heads,n,d,window", [(3, 4, 2, 9, 16, 3), (2, 4, 4, 6, 8, 2), (1, 6, 1, 12, 16, None)])
    def test_prefill_grouped_kv_and_sliding_window(self, attention: AttentionBackend, dtype, b, h, kv_heads, n, d,
                                                   window) -> None:
        """Prefill with fewer KV heads and (when given) a sliding window: query i sees keys
        ``i - window < j <= i`` that are not padding (each position always sees itself)."""
        self._skip_unless(attention, "accepts_grouped_kv")
        gen, seed = fresh_generator()
        device = torch.device(self.compute_device)
        q, k, v = self._inputs((b, h, n, d), (b, kv_heads, n, d), dtype, device, gen)
        valid = random_valid(b, n, gen)
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None])[None] & valid[:, None, :]
        if window is not None:
            allowed &= (i[None, :] > i[:, None] - window)[None]
        allowed |= torch.eye(n, dtype=torch.bool)[None]
        if window is None:
            out = attention.prefill(q, k, v, valid.to(device))
        else:
            out = attention.prefill(q, k, v, valid.to(device), window=window)
        group = h // kv_heads
        expected = reference_attention(q.cpu(), k.cpu().repeat_interleave(group, 1), v.cpu().repeat_interleave(group, 1),
                                       allowed[:, None])
        rows = valid[:, None, :].expand(b, h, n)
        self._check(out, expected, q, dtype, seed, rows=rows)
