"""Decode attention over a (T, B, H, D) cache on x86 CPUs with AVX2, FMA and F16C.

The kernel, and why it reads the cache faster than ``scaled_dot_product_attention`` does, are
in ``decode_attention.c`` beside this file. :func:`takes` says whether a call's tensors are
ones it computes (CPU tensors, a float32, float16 or bfloat16 cache, one query per sequence,
unit stride along the head dimension, whole groups of query heads per KV head, a boolean mask
or none); :func:`decode_attention` checks that and computes, in float32 whatever the cache's
dtype.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from flexgen.kernels.build import AVX2Kernel, profiler_name

SOURCE = Path(__file__).with_name("decode_attention.c")

#: The name a call carries in a torch profiler's table.
PROFILER_NAME = profiler_name("flexgen_decode_attention")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
KERNEL = AVX2Kernel(SOURCE, {"flexgen_decode_attention": [
    _ptr, _i64, _i64, _i64, _i64, _i64,  # q, batch, heads, head_dim, strides
    _ptr, _i64, _i64, _i64,  # k and its strides (position, sequence, head)
    _ptr, _i64, _i64, _i64,  # v and its strides
    _i64, _i64, ctypes.c_int,  # positions, kv_heads, the cache's element type
    _ptr, _i64,  # valid and its row stride
    _ptr, _i64, _i64,  # out and its strides
    _ptr, ctypes.c_int,  # scores scratch, threads
]}, features=("f16c",))

#: The cache dtypes the kernel reads, by the code its C function takes for each.
CACHE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """Whether the kernel is built and usable in this process (builds it the first time)."""
    return KERNEL.available()


def describe() -> str:
    """Whether decode attention on the CPU runs on this kernel here, in one line for the run summary."""
    reason = KERNEL.unavailable_reason()
    if reason:
        return f"CPU decode attention: PyTorch (flexgen's kernel is off: {reason})"
    return "CPU decode attention: flexgen's kernel"


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` computes attention of ``q`` (B, H, 1, D) over ``k``, ``v``
    (B, H_kv, t, D) with ``valid`` (B, t) or None: CPU tensors in any strides with unit stride
    along D, ``k`` and ``v`` of one dtype of :data:`CACHE_DTYPES`, ``q`` of any of them, H a
    multiple of H_kv, a boolean mask; and the kernel available here."""
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    if k.dtype != v.dtype or any(t.dtype not in CACHE_DTYPES or t.device.type != "cpu" or t.dim() != 4
                                 or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    b, h, n, d = q.shape
    if n != 1 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1]:
        return False
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (b, k.shape[2])):
        return False
    return available()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=1.0)`` for
    tensors :func:`takes` accepts (one query per sequence; grouped KV heads shared by their
    group of query heads), computed in float32 on ``torch.get_num_threads()`` threads.
    Returns (B, H, 1, D) in ``q``'s dtype."""
    if not takes(q, k, v, valid):
        raise ValueError("decode_attention: tensors it does not take (see flexgen.kernels.decode_attention.takes)")
    b, h, _, d = q.shape
    kv_heads, positions = k.shape[1], k.shape[2]
    dtype = q.dtype
    out = torch.empty(b, h, 1, d, dtype=torch.float32)
    if b == 0 or h == 0 or d == 0:
        return out.to(dtype)
    q = q.float()  # itself when float32; else a few KiB, one row per (sequence, head)
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    scores = torch.empty(b * h * max(positions, 1), dtype=torch.float32)
    KERNEL.call("flexgen_decode_attention",
                q.data_ptr(), b, h, d, q.stride(0), q.stride(1),
                k.data_ptr(), k.stride(2), k.stride(0), k.stride(1),
                v.data_ptr(), v.stride(2), v.stride(0), v.stride(1),
                positions, kv_heads, CACHE_DTYPES[k.dtype],
                valid.data_ptr() if valid is not None else None, valid.stride(0) if valid is not None else 0,
                out.data_ptr(), out.stride(0), out.stride(1),
                scores.data_ptr(), torch.get_num_threads())
    return out.to(dtype)
