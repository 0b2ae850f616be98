"""The linear product ``x @ weight.T + bias`` of the model math, with the CPU kernel chosen for it.

On the CPU, PyTorch computes float32 ``F.linear`` with the BLAS it was built with (MKL). Three
kernels share the float32 products here, by the number of rows of ``x`` and the size of the
weight (measured on this project's 2-core CI machine, AMD EPYC with AVX2, two threads):

* **Decode: a few rows, a large weight.** A decode step multiplies every weight matrix by one
  row per sequence of the batch, and general-purpose kernels use the two cores poorly there:
  with the matrices of OPT-125M to OPT-1.3B streamed from memory at 32 rows, MKL reaches
  30-70 GFLOP/s and oneDNN 65-100, where a large product with many rows reaches 120-140. This
  project's own kernel (:mod:`flexgen.kernels.few_rows`, compiled at first use) reaches
  80-115 on the same products, measured interleaved (opt-125m's 768 x 3072: 95 against
  oneDNN's 67; OPT-1.3B's 2048 x 8192: 115 against 100 and MKL's 41), and the decode steps of
  a whole opt-125m generation took 3.8-4.0 s instead of 4.1-4.8 s with oneDNN. It takes
  products of up to :data:`FEW_ROWS_MAX_ROWS` rows with weights of at least
  :data:`MIN_WEIGHT_ELEMENTS` elements, where the CPU has AVX2, FMA and F16C, a C compiler
  is found and PyTorch runs on an OpenMP runtime it can share, and PyTorch runs AVX2 code
  (not AVX-512: :func:`few_rows_off_reason`); elsewhere oneDNN takes them.
* **Prefill: many rows, a large weight.** oneDNN: 512 rows of OPT-1.3B's matrices at 108-128
  GFLOP/s against MKL's 80-116, a whole prefill of OPT-1.3B (32 prompts of 16 tokens) 1.35x
  faster, 1.07x at one thread. It also takes the few-row products where the kernel above is
  not available (1.0-2.3x faster than MKL on them).
* **Small weights** (fewer than :data:`MIN_WEIGHT_ELEMENTS` elements): ``F.linear``, as fast
  for them.

The kernels sum in different orders: results differ in the last bits (about 1e-6 of the
outputs' scale), as they already do between MKL's own kernels for different shapes. Greedy
tokens stay equal to HF transformers' in this project's agreement tests.

``FLEXGEN_CPU_LINEAR`` in the environment chooses: ``auto`` (the default, as above),
``onednn`` (no few-row kernel: oneDNN takes the large products) or ``blas`` (every product on
``F.linear``), to compare, or to rule a kernel out. oneDNN's entry point is
``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own compiler emits for CPU linear
layers; a build without it counts as ``blas``. Families of model plugins call :func:`linear`
where they would call ``F.linear`` to get the same choice; weights laid out for it are
row-major (:func:`prefers_row_major`). :func:`describe` is the line the run summary prints.

**Weights unpacked a block of rows at a time.** A weight kept in a smaller form than the one
its product runs in (bfloat16 computed in float32 on a CPU without native bfloat16; int4 or
int8 group-wise compression) can be passed as a :class:`RowBlocks` instead of a tensor. The
product then unpacks 8 MiB of rows into a buffer that stays in the CPU's cache, multiplies
them, and goes on to the next rows, instead of writing the whole weight out in float32 and
reading it back: a decode step's few-row products are bound by memory traffic, which this
cuts from 2 + 4 + 4 to 2 bytes per bfloat16 element (measured on this project's CI machine,
a 2048 x 8192 bfloat16 weight times 4 rows: 12.4 ms unpacked whole into a reused buffer,
6.5 ms by blocks). A float16 or bfloat16 weight that is only converted, not compressed
(:meth:`RowBlocks.held`), is not unpacked at all where the few-row kernel takes the product:
the kernel widens its values in registers as it reads them (same numbers as the float32
weight's, bit for bit).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import cache

import torch
import torch.nn.functional as F

from flexgen.errors import ConfigError
from flexgen.kernels import few_rows
from flexgen.workspace import Workspace

#: Weights with fewer elements stay with BLAS, as fast for them (and kept column-major for it);
#: from opt-125m's 768 x 768 up, oneDNN is 5-30 % faster than MKL with many rows, and the few-row
#: kernel faster than both with few.
MIN_WEIGHT_ELEMENTS = 1 << 19

#: Most rows of ``x`` the few-row kernel takes: beyond, oneDNN's blocked kernel is faster
#: (64 rows of OPT-1.3B's 2048 x 8192: 105 GFLOP/s against the few-row kernel's 95).
FEW_ROWS_MAX_ROWS = 64

#: Bytes of a :class:`RowBlocks` weight unpacked at a time: a few times a core's L2 cache, well
#: within the L3 (smaller blocks cost more in per-block overhead than they save in traffic).
ROW_BLOCK_BYTES = 8 << 20

ENV_VAR = "FLEXGEN_CPU_LINEAR"
KERNELS = ("auto", "onednn", "blas")

_WORKSPACE = Workspace()


class RowBlocks(ABC):
    """A weight of ``shape`` (out, in) not unpacked yet, whose rows can be made a block at a time."""

    #: (out_features, in_features)
    shape: tuple[int, int]

    @abstractmethod
    def rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of the weight, unpacked into ``out`` ((stop - start, in), the
        product's dtype, contiguous); return ``out``."""

    def held(self) -> torch.Tensor | None:
        """The weight as it is held, (out, in), when that is the weight itself in another dtype
        (not compressed), so that a kernel reading that dtype can take it without unpacking;
        None (the default) otherwise."""
        return None


def setting() -> str:
    """``FLEXGEN_CPU_LINEAR``, checked: one of :data:`KERNELS` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in KERNELS:
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(KERNELS)}")
    return value


@cache
def onednn_enabled() -> bool:
    """Whether large CPU products may use oneDNN: the build has it and the environment allows it."""
    if setting() == "blas" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


@cache
def few_rows_enabled() -> bool:
    """Whether decode's products may use the few-row kernel: the environment allows it, it is
    built and usable here (the first call builds it), and PyTorch runs AVX2 code on this CPU
    (:func:`few_rows_off_reason`)."""
    return setting() == "auto" and few_rows_off_reason() is None


def few_rows_off_reason() -> str | None:
    """Why decode's products do not use the few-row kernel here by default, or None when they do.

    Besides a kernel that cannot be built: a CPU on which PyTorch runs AVX-512 code. There
    oneDNN's kernels compute 16 floats per instruction against this AVX2 kernel's 8; no AVX-512
    machine was at hand to measure which is faster, so the vendor library keeps those products
    (``ATEN_CPU_CAPABILITY=avx2`` makes PyTorch, and so this choice, use AVX2 code).
    """
    reason = few_rows.unavailable_reason()
    if reason:
        return reason
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return f"PyTorch runs {capability} code on this CPU, where oneDNN's kernels are wider (ATEN_CPU_CAPABILITY=avx2 to use it)"
    return None


def _large_float32_on_cpu(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and len(weight_shape) == 2
            and weight_shape[0] * weight_shape[1] >= MIN_WEIGHT_ELEMENTS)


def uses_onednn(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`linear` computes a product with such a weight and more rows than the
    few-row kernel takes (all rows, where that kernel is off) with oneDNN."""
    return _large_float32_on_cpu(weight_shape, dtype, device) and onednn_enabled()


def uses_few_rows(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`linear` computes a product with such a weight and at most
    :data:`FEW_ROWS_MAX_ROWS` rows with the few-row kernel."""
    return _large_float32_on_cpu(weight_shape, dtype, device) and few_rows_enabled()


def prefers_row_major(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a weight kept in compute memory should stay row-major (out, in) for decode.

    The few-row kernel reads rows of the weight; oneDNN reads a row-major weight faster than a
    transposed one; BLAS, which computes the remaining products, reads a column-major one
    faster when there are few rows.
    """
    return uses_few_rows(weight_shape, dtype, device) or uses_onednn(weight_shape, dtype, device)


def describe() -> str:
    """Which kernels compute float32 products on the CPU here, in one line for the run summary."""
    kernels = []
    if few_rows_enabled():
        kernels.append("flexgen's few-row kernel (decode)")
    if onednn_enabled():
        kernels.append("oneDNN (large weights)")
    kernels.append("BLAS (the rest)")
    line = "CPU float32 products: " + ", ".join(kernels)
    reason = few_rows_off_reason() if setting() == "auto" else None
    if reason:
        line += f"; the few-row kernel is off: {reason}"
    elif setting() != "auto":
        line += f" ({ENV_VAR}={setting()})"
    return line


def linear(x: torch.Tensor, weight: torch.Tensor | RowBlocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with float32 products of large weights on the CPU computed by
    the few-row kernel (up to :data:`FEW_ROWS_MAX_ROWS` rows) or oneDNN, and a :class:`RowBlocks`
    weight unpacked and multiplied a block of rows at a time."""
    if isinstance(weight, RowBlocks):
        return _by_row_blocks(x, weight, bias)
    if (weight.dtype == x.dtype and weight.device == x.device and not weight.is_sparse and x.dim() >= 1
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and (bias is None or bias.dtype == x.dtype)):
        shape = tuple(weight.shape)
        if (weight.dim() == 2 and weight.stride(-1) == 1 and x.shape[-1] == shape[1]
                and _rows(x) <= FEW_ROWS_MAX_ROWS and uses_few_rows(shape, x.dtype, x.device)):
            y = few_rows.few_rows_linear(_as_rows(x), weight, None if bias is None else bias.contiguous())
            return y.view(*x.shape[:-1], shape[0])
        if uses_onednn(shape, x.dtype, x.device) and _dense(weight):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _dense(weight: torch.Tensor) -> bool:
    """Row- or column-major without gaps: oneDNN copies any other weight element by element
    first (a 2048 x 1024 column slice of a wider matrix: 1.7 s for 32 rows, against F.linear's
    3 ms, measured with torch 2.13)."""
    return weight.is_contiguous() or weight.t().is_contiguous()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D (rows, features) tensor with unit stride along the features."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _by_row_blocks(x: torch.Tensor, weight: RowBlocks, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    x2 = _as_rows(x)
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    # The kernel is chosen for the whole weight, so every block of it is summed the same way.
    shape = (out_features, in_features)
    plain = not (torch.is_grad_enabled() and x.requires_grad) and (bias is None or bias.dtype == x.dtype)
    use_few_rows = plain and x2.shape[0] <= FEW_ROWS_MAX_ROWS and uses_few_rows(shape, x.dtype, x.device)
    onednn = plain and not use_few_rows and uses_onednn(shape, x.dtype, x.device)
    if use_few_rows and bias is not None:
        bias = bias.contiguous()
    held = weight.held() if use_few_rows else None
    if held is not None and tuple(held.shape) == shape and few_rows.reads(held):
        # a half-precision weight read as it is held: widened in registers, nothing unpacked
        return few_rows.few_rows_linear(x2, held, bias, out=y).view(*x.shape[:-1], out_features)
    rows = max(1, min(out_features, ROW_BLOCK_BYTES // (in_features * x.element_size())))
    buffer = _WORKSPACE.empty("linear/row-block", (rows, in_features), x.dtype, x.device)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        block = weight.rows_into(start, stop, buffer[: stop - start])
        part_bias = None if bias is None else bias[start:stop]
        if use_few_rows:
            few_rows.few_rows_linear(x2, block, part_bias, out=y[:, start:stop])
        elif onednn:
            y[:, start:stop] = torch.ops.mkldnn._linear_pointwise(x2, block, part_bias, "none", [], "")
        else:
            y[:, start:stop] = F.linear(x2, block, part_bias)
    return y.view(*x.shape[:-1], out_features)
