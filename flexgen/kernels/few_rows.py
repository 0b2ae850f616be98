"""The float32 product ``x @ weight.T + bias`` for a few rows of ``x`` on x86 CPUs with AVX2, FMA and F16C.

The kernel itself, and why it exists, are in ``few_rows.c`` beside this file; which products
it takes is decided in :mod:`flexgen.linear`. This module builds it on first use
(:class:`flexgen.kernels.build.AVX2Kernel`), says whether it is usable here (:func:`available`, and
:func:`unavailable_reason` when not), and calls it on tensors after checking everything the C
code trusts: dtype, device, shapes and strides.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from flexgen.kernels.build import AVX2Kernel, profiler_name

SOURCE = Path(__file__).with_name("few_rows.c")

#: The name a call carries in a torch profiler's table.
PROFILER_NAME = profiler_name("flexgen_few_rows_linear")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
KERNEL = AVX2Kernel(SOURCE, {"flexgen_few_rows_linear": [_ptr, _i64, _i64, _i64, _ptr, ctypes.c_int, _i64, _i64, _ptr,
                                                          _ptr, _i64, ctypes.c_int]}, features=("f16c",))

#: The weight dtypes the kernel reads, by the code its C function takes for each; half-precision
#: weights are widened to float32 as they are loaded (``x``, ``bias`` and the output are float32).
WEIGHT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """Whether the kernel is built and usable in this process (builds it the first time)."""
    return KERNEL.available()


def unavailable_reason() -> str | None:
    """Why the kernel is not usable here, or None when it is."""
    return KERNEL.unavailable_reason()


def reads(weight: torch.Tensor) -> bool:
    """Whether :func:`few_rows_linear` takes ``weight`` as it is: a 2-D CPU tensor of
    :data:`WEIGHT_DTYPES` with unit stride along its rows."""
    return (weight.dtype in WEIGHT_DTYPES and weight.device.type == "cpu" and weight.dim() == 2
            and weight.stride(1) == 1)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` into ``out`` (M, N) for float32 CPU tensors ``x`` (M, K) and ``out``,
    and ``weight`` (N, K) in float32, float16 or bfloat16 (:func:`reads`), both ``x`` and
    ``weight`` with unit stride along K, a contiguous float32 ``bias`` (N,) or None, and ``out``
    with unit stride along N (a fresh tensor when None); on ``torch.get_num_threads()`` threads."""
    m_rows, k_dim = x.shape
    n_rows = weight.shape[0]
    if out is None:
        out = torch.empty(m_rows, n_rows, dtype=torch.float32)
    for name, t in (("x", x), ("out", out)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"few_rows_linear: {name} must be a 2-D float32 CPU tensor with unit stride along its rows")
    if not reads(weight):
        raise ValueError("few_rows_linear: weight must be a 2-D float32, float16 or bfloat16 CPU tensor with unit "
                         "stride along its rows")
    if weight.shape[1] != k_dim or tuple(out.shape) != (m_rows, n_rows):
        raise ValueError(f"few_rows_linear: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"out {tuple(out.shape)} do not match")
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                             or tuple(bias.shape) != (n_rows,) or not bias.is_contiguous()):
        raise ValueError(f"few_rows_linear: bias must be a contiguous float32 CPU tensor of {n_rows} elements")
    if m_rows and n_rows:
        KERNEL.call("flexgen_few_rows_linear", x.data_ptr(), m_rows, k_dim, x.stride(0), weight.data_ptr(),
                    WEIGHT_DTYPES[weight.dtype], n_rows, weight.stride(0),
                    bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
                    torch.get_num_threads())
    return out
