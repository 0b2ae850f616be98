"""Group-wise asymmetric min-max quantization to 4 or 8 bits (FlexGen's weight/cache compression).

Along one axis of the tensor (``axis``, the last by default) consecutive runs of
``group_size`` values form a *group*. Each group is stored as unsigned integer codes plus its
minimum and its step (``scale``), both in float16:

    code = round((x - min) / scale)  in 0 .. 2**bits - 1,   x ≈ code * scale + min

Min-max per group keeps the error proportional to the local range, so outliers in one group do
not cost precision elsewhere (Sheng et al., 2023, section 5; FlexGen uses 4 bits, group 64 for
both weights and the KV cache).

Parts of a tensor of shape ``S`` with ``L = S[axis]`` values along the grouped axis and
``G = ceil(L / group_size)`` groups (every other axis is kept as it is, in place):

- ``data``: uint8 codes, ``S`` with ``S[axis] = L`` (int8) or ``ceil(L / 2)`` (int4: two codes
  per byte, the even position in the low nibble);
- ``scale`` and ``min``: float16, ``S`` with ``S[axis] = G``.

Why this layout:

- The grouped axis is never padded in storage. When ``L`` is not a multiple of ``group_size``
  the last group is partial; the padding needed to vectorise the arithmetic exists only while
  computing. So a head dimension smaller than the group costs no wasted bytes.
- With the default ``axis=-1`` every part keeps all leading axes of the input: the parts of an
  ``(n, B, H, D)`` slice of a KV cache are ``(n, B, H, ...)``. The engine can therefore write one
  token's parts in place into a preallocated cache and decompress any prefix (or any slice
  along the leading axes) with the matching ``shape``.

Values are computed in float32 whatever the input dtype, and the result is cast once at the
end, so the quantize→dequantize round trip is deterministic and device-independent up to
float32 rounding. Inputs must be finite and within float16's range (|x| < 65504), which holds
for OPT weights and activations; NaN or inf values produce undefined codes.

Decompression runs through :mod:`flexgen.compression.dequant`: one Triton kernel on CUDA where
Triton is installed, otherwise torch operations blocked over rows so that their float32
scratch stays in cache. :meth:`GroupwiseQuantizer.decompress_into` writes into a buffer the
caller keeps (any floating dtype), so a hot loop can reuse one buffer instead of receiving a
new tensor every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from flexgen.compression.base import Compressor, PartSpecs
from flexgen.compression.dequant import dequantize

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class GroupwiseQuantizer(Compressor):
    """Group-wise asymmetric min-max quantization with ``bits`` bits per value (4 or 8).

    Options:
        group_size: values per group along ``axis`` (int >= 1, default 64).
        axis: the grouped axis (int, negative counts from the end, default -1). Use -1 for
            KV caches; any axis is fine for weights.
    """

    bits: int = 8

    def __init__(self, group_size: int = 64, axis: int = -1, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        self.group_size = group_size
        self.axis = axis
        self.max_code = (1 << self.bits) - 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size}, axis={self.axis})"

    # -- shapes -----------------------------------------------------------------------------

    def _packed_length(self, length: int) -> int:
        """Bytes of codes for ``length`` values along the grouped axis."""
        return (length + 1) // 2 if self.bits == 4 else length

    def _layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[PartSpecs, int, int, int]:
        """Part specs of a tensor of ``shape``, with its grouped axis (non-negative), the values
        along that axis and the groups they form; errors for a non-float dtype or a bad axis."""
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__} quantizes floating-point tensors, got {dtype}")
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {tuple(shape)}")
        axis = self.axis % ndim
        length = shape[axis]
        groups = -(-length // self.group_size)

        def with_axis(n: int) -> tuple[int, ...]:
            return shape[:axis] + (n,) + shape[axis + 1 :]

        specs = {
            "data": (with_axis(self._packed_length(length)), torch.uint8),
            "scale": (with_axis(groups), torch.float16),
            "min": (with_axis(groups), torch.float16),
        }
        return specs, axis, length, groups

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        return self._layout(tuple(int(s) for s in shape), dtype)[0]

    # -- compress ---------------------------------------------------------------------------

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        specs, axis, length, groups = self._layout(tuple(x.shape), x.dtype)
        if x.numel() == 0:
            return {name: torch.zeros(s, dtype=d, device=x.device) for name, (s, d) in specs.items()}

        # One float32 working copy, then in-place arithmetic: a large weight costs one float32
        # temporary on the device that compresses it, not several.
        g = self.group_size
        v = x.movedim(axis, -1).to(torch.float32, copy=True)
        lead = v.shape[:-1]
        pad = groups * g - length
        if pad:
            # Repeat the last value so the padding never widens the last group's range.
            v = torch.cat([v, v[..., -1:].expand(*lead, pad)], dim=-1)
        v = v.reshape(*lead, groups, g)

        # Min and step are rounded to float16 first and the codes computed from the rounded
        # values, so dequantization uses exactly the numbers the codes were made for.
        lo = v.amin(dim=-1).to(torch.float16)
        hi = v.amax(dim=-1)
        scale = ((hi - lo.float()) / self.max_code).to(torch.float16)
        lo32, scale32 = lo.float().unsqueeze(-1), scale.float().unsqueeze(-1)
        # A constant group has scale 0: dividing by the smallest normal float instead gives
        # codes of 0 (or clamped ones), and every code decodes to the minimum either way.
        safe = scale32.clamp_min(torch.finfo(torch.float32).tiny)
        codes = v.sub_(lo32).div_(safe).round_().clamp_(0, self.max_code).to(torch.uint8)
        codes = codes.reshape(*lead, groups * g)[..., :length]

        if self.bits == 4:
            if length % 2:
                codes = F.pad(codes, (0, 1))
            pairs = codes.reshape(*lead, -1, 2)
            codes = pairs[..., 0] | (pairs[..., 1] << 4)

        parts = {"data": codes, "scale": scale, "min": lo}
        return {name: t.movedim(-1, axis).contiguous() for name, t in parts.items()}

    # -- decompress -------------------------------------------------------------------------

    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        device = parts["data"].device if "data" in parts else None
        return self.decompress_into(parts, torch.empty(shape, dtype=dtype, device=device), dtype)

    def decompress_into(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        shape = tuple(out.shape)
        specs, axis, _, _ = self._layout(shape, out.dtype if dtype is None else dtype)
        if out.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}.decompress_into: out must be floating point, got {out.dtype}")
        for name, (s, d) in specs.items():
            if name not in parts:
                raise ValueError(f"{type(self).__name__}.decompress: missing part {name!r}")
            part = parts[name]
            if tuple(part.shape) != s or part.dtype != d:
                raise ValueError(
                    f"{type(self).__name__}.decompress: part {name!r} is {tuple(part.shape)} {part.dtype}, "
                    f"expected {s} {d} for a tensor of shape {shape}"
                )
            if part.device != out.device:
                raise ValueError(f"{type(self).__name__}.decompress_into: part {name!r} on {part.device}, out on {out.device}")
        if out.numel() == 0:
            return out
        dequantize(
            parts["data"].movedim(axis, -1), parts["scale"].movedim(axis, -1), parts["min"].movedim(axis, -1),
            out.movedim(axis, -1), bits=self.bits, group_size=self.group_size,
        )
        return out


class Int4Compressor(GroupwiseQuantizer):
    """4-bit group-wise quantization, two codes per byte (about 0.28× float16 with group 64)."""

    bits = 4


class Int8Compressor(GroupwiseQuantizer):
    """8-bit group-wise quantization (about 0.53× float16 with group 64)."""

    bits = 8
