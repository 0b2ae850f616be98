"""The float32 product ``x @ weight.T + bias`` for a few rows of ``x`` on x86 CPUs with AVX2 and FMA.

The kernel itself, and why it exists, are in ``few_rows.c`` beside this file; which products
it takes is decided in :mod:`flexgen.linear`. This module builds it on first use
(:func:`flexgen.kernels.build.build`), says whether it is usable here (:func:`available`, and
:func:`unavailable_reason` when not), and calls it on tensors after checking everything the C
code trusts: dtype, device, shapes and strides.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import cache
from pathlib import Path

import torch

from flexgen.kernels.build import KernelUnavailable, build

SOURCE = Path(__file__).with_name("few_rows.c")
FLAGS = ["-mavx2", "-mfma"]

#: The name a call carries in a torch profiler's trace (only while one records: 9 µs a call otherwise).
PROFILER_NAME = "flexgen::few_rows_linear"


@cache
def _load() -> ctypes.CDLL | str:
    """The built library, or the reason it is not usable here."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for x86-64 Linux only (this is {sys.platform} on {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU (or ATEN_CPU_CAPABILITY) offers {capability}, not AVX2 with FMA"
    try:
        lib = build(SOURCE, FLAGS)
    except KernelUnavailable as exc:
        return str(exc)
    fn = lib.flexgen_few_rows_linear
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
    fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built and usable in this process (builds it the first time)."""
    return not isinstance(_load(), str)


def unavailable_reason() -> str | None:
    """Why the kernel is not usable here, or None when it is."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` into ``out`` (M, N) for float32 CPU tensors ``x`` (M, K) and ``weight`` (N, K),
    both with unit stride along K, a contiguous ``bias`` (N,) or None, and ``out`` with unit stride
    along N (a fresh tensor when None); on ``torch.get_num_threads()`` threads."""
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(f"the few-row kernel is not available: {loaded}")
    m_rows, k_dim = x.shape
    n_rows = weight.shape[0]
    if out is None:
        out = torch.empty(m_rows, n_rows, dtype=torch.float32)
    for name, t in (("x", x), ("weight", weight), ("out", out)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"few_rows_linear: {name} must be a 2-D float32 CPU tensor with unit stride along its rows")
    if weight.shape[1] != k_dim or tuple(out.shape) != (m_rows, n_rows):
        raise ValueError(f"few_rows_linear: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"out {tuple(out.shape)} do not match")
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                             or tuple(bias.shape) != (n_rows,) or not bias.is_contiguous()):
        raise ValueError(f"few_rows_linear: bias must be a contiguous float32 CPU tensor of {n_rows} elements")
    if m_rows and n_rows:
        args = (x.data_ptr(), m_rows, k_dim, x.stride(0), weight.data_ptr(), n_rows, weight.stride(0),
                bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0), torch.get_num_threads())
        if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
            with torch.profiler.record_function(PROFILER_NAME):  # a C call is invisible to the profiler otherwise
                loaded.flexgen_few_rows_linear(*args)
        else:
            loaded.flexgen_few_rows_linear(*args)
    return out
