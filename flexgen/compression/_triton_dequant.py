"""The Triton kernel of group-wise dequantisation (imported only when Triton is installed).

One program handles a tile of ``BLOCK_R`` rows × ``BLOCK_C`` output columns: it loads the
packed bytes under the tile (for 4 bits, each byte serves two neighbouring columns), the
float16 scale and minimum of each column's group, computes ``code * scale + min`` in float32
and stores the tile in the output's dtype. Memory traffic is the packed bytes, the group
statistics and the output, once each: about 2.6 bytes per float16 output element for int4
with groups of 64, against about 37 for the whole-tensor torch sequence this replaces.

Rows are the flattened leading axes; every operand needs a contiguous last axis and one row
stride (operands that are not laid out so are copied, the output written through a temporary).
Offsets are 64-bit, so tensors beyond 2**31 elements are fine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_C = 128


@triton.jit
def _dequant_kernel(
    data_ptr, scale_ptr, min_ptr, out_ptr,
    rows, length,
    data_stride, scale_stride, min_stride, out_stride,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
    mask = (r < rows) & (c < length)
    if BITS == 4:
        byte = tl.load(data_ptr + r * data_stride + c // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((c % 2) * 4).to(tl.int32)) & 0x0F
    else:
        code = tl.load(data_ptr + r * data_stride + c, mask=mask, other=0).to(tl.int32)
    group = c // GROUP
    scale = tl.load(scale_ptr + r * scale_stride + group, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(min_ptr + r * min_stride + group, mask=mask, other=0.0).to(tl.float32)
    value = code.to(tl.float32) * scale + low
    tl.store(out_ptr + r * out_stride + c, value.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def dequantize(
    data: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, out: torch.Tensor, *, bits: int, group_size: int
) -> torch.Tensor:
    """Write ``code * scale + lo`` into ``out`` (..., L) with one kernel launch; returns ``out``."""
    length = out.shape[-1]
    d, s, m = _as_rows(data), _as_rows(scale), _as_rows(lo)
    rows = d.shape[0]
    try:
        o = out.view(-1, length)
        direct = o.stride(-1) == 1 or length == 1
    except RuntimeError:
        direct = False
    if not direct:
        o = torch.empty((rows, length), dtype=out.dtype, device=out.device)
    if rows and length:
        grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(length, BLOCK_C))
        _dequant_kernel[grid](
            d, s, m, o, rows, length,
            d.stride(0), s.stride(0), m.stride(0), o.stride(0),
            BITS=bits, GROUP=group_size, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )
    if not direct:
        out.copy_(o.view(out.shape))
    return out
