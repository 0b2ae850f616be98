"""Group-wise dequantisation kernels: packed codes, per-group scale and minimum -> floats.

``x = code * scale + min``, computed in float32 and rounded once to the output's dtype, for
codes of 4 bits (two per byte, the even position in the low nibble) or 8 bits, in groups of
``group_size`` consecutive values along the last axis (the last group may be partial). This is
the arithmetic of :mod:`flexgen.compression.groupwise`; the format itself is described there.

Why a module of its own: decompression is in the hot loop (every weight of every layer each
step when weights are offloaded, every cache block in every decode attention call with a
compressed cache), so how it runs matters as much as what it computes. Written as a sequence
of whole-tensor float32 torch operations it moved about 37 bytes of memory per output
element (several float32 temporaries, each written and read back); the paths here move the
packed bytes in and the output bytes out:

- :func:`dequantize_torch`, the reference, on any device: rows are processed in blocks whose
  float32 scratch (from a reused :class:`~flexgen.workspace.Workspace`) stays in the CPU's
  cache: codes are converted into it, multiplied and offset in place, and one final copy
  casts it into the output (skipped when the output is float32: the block is the output).
  Torch has no eager operation that turns uint8 codes and float16 group statistics into
  floats in one vectorised pass (mixed-dtype or broadcast ``addcmul`` falls back to loops
  several times slower than separate vectorised passes), so three or four passes over a
  cache-resident block are what the torch path does; main memory sees each input and output
  byte once.
- :func:`dequantize_triton`, on CUDA when Triton is installed: one kernel reads each packed
  byte and group statistic and writes each output element once. It must equal the reference
  up to float32 rounding (a fused multiply-add may round once where torch rounds twice);
  ``tests/test_dequant.py`` checks this on the GPU, and on the CPU through Triton's
  interpreter where Triton is installed.

:func:`dequantize` chooses between them: the kernel on CUDA unless ``FLEXGEN_DISABLE_TRITON=1``
is set, or the kernel failed once in this process (a broken Triton install; a warning says so).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

from flexgen.workspace import Workspace

#: Float32 elements per block of the torch path on the CPU: 8 MiB of scratch, within the last
#: level cache. Smaller blocks that fit L2 lose more to per-operation overhead than they gain
#: (measured on 2 cores, 5120 x 5120 weights to float16: blocks of 256 Ki elements took 1.8x
#: the time of 2 Mi, 1 Mi about the same); it matches the CPU attention's default block,
#: which it then dequantises in one piece.
CPU_BLOCK_ELEMENTS = 1 << 21
#: On a GPU there is no cache to fit; blocks only bound the float32 scratch (64 MiB).
GPU_BLOCK_ELEMENTS = 1 << 24

_SCRATCH = Workspace()


_triton_failed: str | None = None


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available() -> bool:
    """Whether the Triton kernel can be used: importable, not switched off, not failed before."""
    if os.environ.get("FLEXGEN_DISABLE_TRITON", "") not in ("", "0"):
        return False
    return _triton_failed is None and _triton_importable()


def dequantize(
    data: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, *, bits: int, group_size: int,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Write ``code * scale + lo`` into ``out`` (..., L): the fused kernel on CUDA when it can run.

    ``data`` is (..., ceil(L / 2)) uint8 for 4 bits or (..., L) for 8 bits; ``scale`` and ``lo``
    are (..., ceil(L / group_size)) float16; leading axes equal ``out``'s. Returns ``out``.
    """
    if out.device.type == "cuda" and triton_available():
        try:
            return dequantize_triton(data, scale, lo, out, bits=bits, group_size=group_size)
        except Exception as exc:  # a broken Triton install (no compiler, old driver) must not stop a run
            global _triton_failed
            _triton_failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"flexgen: the Triton dequantisation kernel failed ({_triton_failed}); "
                          "using the torch path from now on", RuntimeWarning, stacklevel=2)
    return dequantize_torch(data, scale, lo, out, bits=bits, group_size=group_size, workspace=workspace)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, last axis), a view when its leading axes allow one."""
    return x.reshape(-1, x.shape[-1])


def dequantize_torch(
    data: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, *, bits: int, group_size: int,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The reference path in torch operations, blocked over rows (see the module docstring)."""
    length = out.shape[-1]
    groups = scale.shape[-1]
    packed = data.shape[-1]
    # The row the group arithmetic works on: whole groups, and every code a byte holds.
    width = max(groups * group_size, 2 * packed if bits == 4 else packed)
    workspace = workspace or _SCRATCH
    out_rows = out.view(-1, length) if _viewable_as_rows(out) else None
    target = out_rows if out_rows is not None else torch.empty(out.shape, dtype=out.dtype, device=out.device).view(-1, length)
    data, scale, lo = _rows(data), _rows(scale), _rows(lo)
    rows = target.shape[0]
    limit = CPU_BLOCK_ELEMENTS if out.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    step = max(1, limit // width)
    in_place = target.dtype == torch.float32 and width == length
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        f = target[r0:r1] if in_place else workspace.empty("dequant", (n, width), torch.float32, out.device)
        if bits == 4:
            _unpack_nibbles(data[r0:r1], f[:, : 2 * packed], workspace)
        else:
            f[:, :length].copy_(data[r0:r1])
        # Positions past ``length`` hold stale scratch; their results are never read.
        grouped = f[:, : groups * group_size].view(n, groups, group_size)
        # Two in-place passes over a block in cache: vectorised, where one mixed-dtype
        # ``addcmul`` with broadcast scales runs several times slower on CPUs.
        grouped.mul_(scale[r0:r1, :, None].float()).add_(lo[r0:r1, :, None].float())
        if not in_place:
            target[r0:r1].copy_(f[:, :length])
    if out_rows is None:
        out.copy_(target.view(out.shape))
    return out


def _unpack_nibbles(data: torch.Tensor, codes: torch.Tensor, workspace: Workspace) -> None:
    """Write the codes of packed bytes (n, P) into ``codes`` (n, 2P, float), low nibble first.

    Byte ``b = 16 hi + lo`` becomes the 16-bit integer ``256 hi + lo = b + 15 (b & 0xF0)``,
    whose two bytes in memory (little-endian) are ``lo, hi``: the codes already interleaved,
    in three vectorised integer operations and one conversion, where writing low and high
    nibbles to alternate float slots is a strided store about three times slower.
    """
    if sys.byteorder != "little" or data.device.type != "cpu":
        codes[:, 0::2].copy_(data & 0x0F)
        codes[:, 1::2].copy_(data >> 4)
        return
    wide = workspace.empty("nibbles", tuple(data.shape), torch.int16, data.device)
    high = workspace.empty("nibbles_high", tuple(data.shape), torch.int16, data.device)
    wide.copy_(data)
    torch.bitwise_and(wide, 0xF0, out=high)
    wide.add_(high, alpha=15)
    codes.copy_(wide.view(torch.uint8).view(codes.shape))


def _viewable_as_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` can be viewed as (rows, last axis) with a contiguous last axis."""
    if x.dim() == 0 or (x.stride(-1) != 1 and x.shape[-1] > 1):
        return False
    try:
        x.view(-1, x.shape[-1])
    except RuntimeError:
        return False
    return True


def dequantize_triton(
    data: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, *, bits: int, group_size: int
) -> torch.Tensor:
    """One Triton kernel: each packed byte and group statistic read once, each output written once."""
    from flexgen.compression import _triton_dequant

    return _triton_dequant.dequantize(data, scale, lo, out, bits=bits, group_size=group_size)
