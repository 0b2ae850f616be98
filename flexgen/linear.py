"""The linear product ``x @ weight.T + bias`` of the model math, with the CPU kernel chosen for it.

On the CPU, PyTorch computes float32 ``F.linear`` with the BLAS it was built with (MKL).
A decode step multiplies every weight matrix by a handful of rows (one per sequence of the
batch), and there MKL leaves much of two cores unused: measured on this project's 2-core
CI machine (AMD EPYC, AVX2), oneDNN's kernel for the same product is 1.0–2.3x faster at two
threads for matrices of a million elements or more with up to 64 rows, and the output
embedding of OPT-125M (50,272 x 768) takes 26 ms instead of 47 ms. With many rows (prefill)
it is faster too at those sizes (512 rows of OPT-1.3B's matrices: 108–128 GFLOP/s against
80–116 for MKL, measured interleaved), and a whole prefill of OPT-1.3B (32 prompts of 16
tokens) takes 10.8 s instead of 14.6 s, 1.07x faster at one thread. For small matrices the
two are even. So :func:`linear` sends float32 products with large weights to oneDNN and
everything else to ``F.linear``.

The two kernels sum in different orders: results differ in the last bits (about 1e-6 of
the outputs' scale), as they already do between MKL's own kernels for different shapes.
Greedy tokens stay equal to HF transformers' in this project's agreement tests.

oneDNN's entry point is ``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own
compiler emits for CPU linear layers; where a build lacks it, or with
``FLEXGEN_CPU_LINEAR=blas`` in the environment (to compare, or to rule the kernel out),
every product goes to ``F.linear``. Families of model plugins call :func:`linear` where
they would call ``F.linear`` to get the same choice; weights laid out for it are
row-major (:func:`prefers_row_major`).

**Weights unpacked a block of rows at a time.** A weight kept in a smaller form than the one
its product runs in (bfloat16 computed in float32 on a CPU without native bfloat16; int4 or
int8 group-wise compression) can be passed as a :class:`RowBlocks` instead of a tensor. The
product then unpacks 8 MiB of rows into a buffer that stays in the CPU's cache, multiplies
them, and goes on to the next rows, instead of writing the whole weight out in float32 and
reading it back: a decode step's few-row products are bound by memory traffic, which this
cuts from 2 + 4 + 4 to 2 bytes per bfloat16 element (measured on this project's CI machine,
a 2048 x 8192 bfloat16 weight times 4 rows: 12.4 ms unpacked whole into a reused buffer,
6.5 ms by blocks).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import cache

import torch
import torch.nn.functional as F

from flexgen.errors import ConfigError
from flexgen.workspace import Workspace

#: Weights with fewer elements stay with BLAS, as fast for them (and kept column-major for it).
ONEDNN_MIN_WEIGHT_ELEMENTS = 1 << 20

#: Bytes of a :class:`RowBlocks` weight unpacked at a time: a few times a core's L2 cache, well
#: within the L3 (smaller blocks cost more in per-block overhead than they save in traffic).
ROW_BLOCK_BYTES = 8 << 20

ENV_VAR = "FLEXGEN_CPU_LINEAR"
KERNELS = ("auto", "blas")

_WORKSPACE = Workspace()


class RowBlocks(ABC):
    """A weight of ``shape`` (out, in) not unpacked yet, whose rows can be made a block at a time."""

    #: (out_features, in_features)
    shape: tuple[int, int]

    @abstractmethod
    def rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of the weight, unpacked into ``out`` ((stop - start, in), the
        product's dtype, contiguous); return ``out``."""


@cache
def onednn_enabled() -> bool:
    """Whether few-row CPU products may use oneDNN: the build has it and the environment allows it."""
    setting = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if setting not in KERNELS:
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(KERNELS)}")
    if setting == "blas" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def uses_onednn(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`linear` computes a product with such a weight with oneDNN."""
    return (device.type == "cpu" and dtype == torch.float32 and len(weight_shape) == 2
            and weight_shape[0] * weight_shape[1] >= ONEDNN_MIN_WEIGHT_ELEMENTS and onednn_enabled())


def prefers_row_major(weight_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a weight kept in compute memory should stay row-major (out, in) for decode.

    oneDNN reads a row-major weight faster than a transposed one; BLAS, which computes the
    products oneDNN does not, reads a column-major one faster when there are few rows.
    """
    return uses_onednn(weight_shape, dtype, device)


def linear(x: torch.Tensor, weight: torch.Tensor | RowBlocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with float32 products of large weights on the CPU computed by
    oneDNN, and a :class:`RowBlocks` weight unpacked and multiplied a block of rows at a time."""
    if isinstance(weight, RowBlocks):
        return _by_row_blocks(x, weight, bias)
    if (weight.dtype == x.dtype and weight.device == x.device and not weight.is_sparse
            and uses_onednn(tuple(weight.shape), x.dtype, x.device)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and (bias is None or bias.dtype == x.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _by_row_blocks(x: torch.Tensor, weight: RowBlocks, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    rows = max(1, min(out_features, ROW_BLOCK_BYTES // (in_features * x.element_size())))
    buffer = _WORKSPACE.empty("linear/row-block", (rows, in_features), x.dtype, x.device)
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    # The kernel is chosen for the whole weight, so every block of it is summed the same way.
    onednn = (uses_onednn((out_features, in_features), x.dtype, x.device)
              and not (torch.is_grad_enabled() and x.requires_grad))
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        block = weight.rows_into(start, stop, buffer[: stop - start])
        part_bias = None if bias is None else bias[start:stop]
        if onednn:
            y[:, start:stop] = torch.ops.mkldnn._linear_pointwise(x2, block, part_bias, "none", [], "")
        else:
            y[:, start:stop] = F.linear(x2, block, part_bias)
    return y.view(*x.shape[:-1], out_features)
