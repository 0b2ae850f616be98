"""Contract of a :class:`flexgen.attention.base.AttentionBackend`.

Every backend must compute ``softmax(q kᵀ + mask) v`` (``q`` already scaled) as a float64
reference does, for random inputs with padding: decode over a cache where ``valid`` is False
at masked positions, and causal prefill where padded keys are hidden. Outputs have the shape
of ``q``, its dtype and its device; the cache is read, never written.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexgen.attention.base import AttentionBackend
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


class AttentionBackendContract:
    """Subclass as ``Test...`` and implement :meth:`make_attention` (or override ``attention``).

    Attributes a subclass may change:
        compute_device: the engine's compute device, passed to ``attention.device``.
        tolerances: {dtype: (rtol, atol)} against the float64 reference.
    """

    compute_device: str = "cpu"
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
