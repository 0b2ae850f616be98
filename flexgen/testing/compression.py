"""Contract of a :class:`flexgen.compression.base.Compressor`.

What the engine relies on: ``part_specs`` says exactly what ``compress`` returns (it
preallocates caches and budgets memory from it); ``nbytes`` is the size of those parts;
``decompress`` restores shape and dtype on the parts' device within the format's error; the
input is never modified. A *cache-compatible* compressor (one that groups along the last axis)
also keeps the leading axes of an ``(n, B, H, D)`` slice in every part, compresses each token
independently, and decompresses any slice of the parts along the leading axes.
"""

from __future__ import annotations

import pytest
import torch

from flexgen.compression.base import Compressor
from flexgen.testing._random import fresh_generator, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(64, 256), (3, 5, 67), (7,), (2, 3, 4, 16), (33, 1)]


def relative_error(y: torch.Tensor, x: torch.Tensor) -> float:
    """‖y − x‖ / ‖x‖ in float64."""
    x64, y64 = x.detach().cpu().double(), y.detach().cpu().double()
    return ((y64 - x64).norm() / x64.norm()).item()


def _specs_of(parts) -> dict:
    return {name: (tuple(p.shape), p.dtype) for name, p in parts.items()}


class CompressorContract:
    """Subclass as ``Test...`` and implement :meth:`make_compressor` (or override ``compressor``).

    Attributes a subclass may change:
        max_relative_error: bound on ‖decompress(compress(x)) − x‖ / ‖x‖ for x ~ N(0, 1) of
            shape (128, 256) (0 means lossless).
        max_size_ratio: bound on compressed bytes / float16 bytes of that tensor (None: unchecked).
        cache_compatible: the compressor may be used for the KV cache (groups along the last
            axis); enables the in-place and slicing checks.
        device: where inputs are made.
    """

    max_relative_error: float = 0.0
    max_size_ratio: float | None = None
    cache_compatible: bool = True
    device: str = "cpu"

    def make_compressor(self) -> Compressor:
        """The compressor under test."""
        raise NotImplementedError("subclass CompressorContract and implement make_compressor()")

    def relative_error_bound(self, compressor: Compressor) -> float:
        """The round-trip bound for ``compressor`` (``max_relative_error`` unless overridden)."""
        return self.max_relative_error

    def size_ratio_bound(self, compressor: Compressor) -> float | None:
        """The size bound for ``compressor`` (``max_size_ratio`` unless overridden)."""
        return self.max_size_ratio

    def is_cache_compatible(self, compressor: Compressor) -> bool:
        """Whether to run the cache checks (``cache_compatible`` unless overridden)."""
        return self.cache_compatible

    @pytest.fixture
    def compressor(self) -> Compressor:
        return self.make_compressor()

    # -- shapes and sizes --------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_part_specs_match_compress(self, compressor: Compressor, shape, dtype) -> None:
        gen, seed = fresh_generator()
        x = randn(shape, gen, dtype, self.device)
        specs = compressor.part_specs(shape, dtype)
        parts = compressor.compress(x)
        assert _specs_of(parts) == {k: (tuple(s), d) for k, (s, d) in specs.items()}, f"seed {seed}"
        for name, part in parts.items():
            assert part.device == x.device, f"part {name!r} on {part.device}, input on {x.device}"
        nbytes = sum(p.numel() * p.element_size() for p in parts.values())
        assert compressor.nbytes(shape, dtype) == nbytes, "nbytes() disagrees with the parts"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_decompress_restores_shape_dtype_device(self, compressor: Compressor, shape, dtype) -> None:
        gen, _ = fresh_generator()
        x = randn(shape, gen, dtype, self.device)
        y = compressor.decompress(compressor.compress(x), shape, dtype)
        assert tuple(y.shape) == tuple(shape) and y.dtype == dtype and y.device == x.device

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_round_trip_error(self, compressor: Compressor, dtype) -> None:
        gen, seed = fresh_generator()
        x = randn((128, 256), gen, dtype, self.device)
        y = compressor.decompress(compressor.compress(x), tuple(x.shape), dtype)
        bound = self.relative_error_bound(compressor)
        error = relative_error(y, x)
        assert error <= bound, f"relative error {error:.5f} > {bound} ({dtype}, seed {seed})"

    def test_size_ratio(self, compressor: Compressor) -> None:
        bound = self.size_ratio_bound(compressor)
        if bound is None:
            pytest.skip("no size bound declared")
        ratio = compressor.nbytes((128, 256), torch.float16) / (128 * 256 * 2)
        assert ratio <= bound, f"compressed size {ratio:.3f} × float16 > {bound}"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_decompress_into_matches_decompress(self, compressor: Compressor, dtype) -> None:
        """Into a buffer of the tensor's dtype: exactly what ``decompress`` returns; into float32:
        the same values before their rounding to ``dtype`` (so within that rounding)."""
        gen, seed = fresh_generator()
        shape = (24, 96)
        parts = compressor.compress(randn(shape, gen, dtype, self.device))
        expected = compressor.decompress(parts, shape, dtype)
        out = torch.full(shape, float("nan"), dtype=dtype, device=self.device)
        assert compressor.decompress_into(parts, out, dtype) is out
        assert torch.equal(out, expected), f"decompress_into differs from decompress (seed {seed})"
        wide = torch.full(shape, float("nan"), dtype=torch.float32, device=self.device)
        compressor.decompress_into(parts, wide, dtype)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(wide.to(dtype).float(), expected.float(), rtol=eps, atol=eps * expected.float().abs().max().item(),
                                   msg=lambda m: f"{m}\n(float32 output, seed {seed})")

    def test_input_not_modified_and_deterministic(self, compressor: Compressor) -> None:
        gen, seed = fresh_generator()
        x = randn((16, 96), gen, torch.float32, self.device)
        before = x.clone()
        first = {k: v.clone() for k, v in compressor.compress(x).items()}
        assert torch.equal(x, before), "compress modified its input"
        second = compressor.compress(x)
        for name in first:
            assert torch.equal(first[name], second[name]), f"part {name!r} differs between calls (seed {seed})"

    def test_non_contiguous_input(self, compressor: Compressor) -> None:
        gen, seed = fresh_generator()
        x = randn((96, 40), gen, torch.float32, self.device).t()
        y = compressor.decompress(compressor.compress(x), tuple(x.shape), x.dtype)
        z = compressor.decompress(compressor.compress(x.contiguous()), tuple(x.shape), x.dtype)
        assert torch.equal(y, z), f"a non-contiguous input compresses differently (seed {seed})"

    def test_unknown_option_is_a_type_error(self, compressor: Compressor) -> None:
        with pytest.raises(TypeError):
            type(compressor)(no_such_option_xyz=1)

    # -- the KV cache ------------------------------------------------------------------------

    def _skip_unless_cache(self, compressor: Compressor) -> None:
        if not self.is_cache_compatible(compressor):
            pytest.skip("not declared cache-compatible")

    @pytest.mark.parametrize("d", [16, 64, 80, 128])
    def test_cache_parts_keep_leading_axes(self, compressor: Compressor, d: int) -> None:
        self._skip_unless_cache(compressor)
        for n in (1, 5):
            for name, (shape, _) in compressor.part_specs((n, 3, 2, d), torch.float16).items():
                assert tuple(shape[:3]) == (n, 3, 2), f"part {name!r} is {tuple(shape)}, must start with (n, B, H)"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_cache_written_token_by_token_then_sliced(self, compressor: Compressor, dtype) -> None:
        """What the engine does: preallocate, write each token's parts in place, read slices."""
        self._skip_unless_cache(compressor)
        gen, seed = fresh_generator()
        n, b, h, d = 7, 3, 2, 80
        x = randn((n, b, h, d), gen, dtype, self.device)
        cache = {
            name: torch.zeros(shape, dtype=pdtype, device=self.device)
            for name, (shape, pdtype) in compressor.part_specs((n, b, h, d), dtype).items()
        }
        for t in range(n):
            for name, part in compressor.compress(x[t : t + 1]).items():
                cache[name][t : t + 1].copy_(part)
        whole = compressor.compress(x)
        for name in whole:
            assert torch.equal(cache[name], whole[name]), (
                f"part {name!r}: tokens compressed one by one differ from the whole slice (seed {seed})"
            )
        full = compressor.decompress(cache, (n, b, h, d), dtype)
        bound = self.relative_error_bound(compressor)
        assert relative_error(full, x) <= max(bound * 1.5, bound + 1e-6), f"seed {seed}"
        prefix = compressor.decompress({k: v[:4] for k, v in cache.items()}, (4, b, h, d), dtype)
        assert torch.equal(prefix, full[:4]), f"decompressing a prefix differs (seed {seed})"
        rows = compressor.decompress({k: v[:, 1:] for k, v in cache.items()}, (n, b - 1, h, d), dtype)
        assert torch.equal(rows, full[:, 1:]), f"decompressing a batch slice differs (seed {seed})"
