"""Compressors backed by bitsandbytes: NF4 and FP4 (4-bit, block-wise) and int8 (row-wise).

bitsandbytes is the library people already use for 4-bit and 8-bit weights. It quantizes
and dequantizes on CUDA and, in the 0.50 releases this plugin is tested with, on the CPU too,
so these compressors work for every compute device FlexGen supports.

Layout. FlexGen's parts must be plain tensors, and a cache compressor's parts must keep the
leading axes of its input ((n, B, H) for a (n, B, H, D) cache slice), so that the engine can
write each new token's parts in place. bitsandbytes quantizes a *flattened* tensor in blocks
of ``blocksize`` consecutive values, and a block would straddle two rows whenever the last
axis is not a multiple of ``blocksize``. So every tensor is viewed as rows along its last
axis, each row is zero-padded to a multiple of ``blocksize`` (zeros never change a block's
absmax), and then the whole thing goes to bitsandbytes in one call: every block lies within
one row and the parts reshape to ``(*leading axes, ...)``. Only the packed codes and the
per-block ``absmax`` are stored; the rest of bitsandbytes' ``QuantState`` (the 16-entry code
book, block size, shape, dtype) follows from the options and from the ``shape`` and ``dtype``
given to :meth:`decompress`. Nested ("double") quantization of ``absmax`` is not offered: it
flattens statistics across rows, which would break the per-row layout.

int8 is bitsandbytes' LLM.int8() row-wise absmax quantization (``int8_vectorwise_quant``)
without the outlier decomposition: one float32 scale per last-axis row.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from flexgen.compression.base import Compressor, PartSpecs


if importlib.util.find_spec("bitsandbytes") is None:
    # Said when flexgen lists plugins, as one line; bitsandbytes itself is imported only when
    # one of these compressors is used (it takes seconds, which every run would pay otherwise).
    raise ImportError("bitsandbytes is not installed (pip install bitsandbytes)")


@functools.lru_cache(maxsize=1)
def bnbf() -> Any:
    """``bitsandbytes.functional``, imported on first use, without its unrelated CPU-gemm warning.

    On CPUs with AVX512-BF16 bitsandbytes tries to fetch an optional gemm kernel from the
    ``kernels`` package and logs a warning when it is missing; we never use that gemm, so the
    warning would only mislead. The logger's level is restored afterwards.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    finally:
        logger.setLevel(level)
    return bnb_functional

#: dtypes bitsandbytes quantizes from and dequantizes to directly; others go through float32.
_NATIVE = (torch.float16, torch.bfloat16, torch.float32)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _rows(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Split a shape into (leading axes, row length); a 0-d tensor is one row of one value."""
    shape = tuple(shape)
    return (shape[:-1], shape[-1]) if shape else ((), 1)


class BitsAndBytes4bit(Compressor):
    """4-bit block-wise quantization by bitsandbytes; ``quant_type`` is ``nf4`` or ``fp4``.

    Parts: ``packed`` (*leading, padded_row/2) uint8, two codes per byte; ``absmax``
    (*leading, padded_row/blocksize) float32. At ``blocksize`` 64 that is 4.5 bits per value.
    """

    #: set by the named subclasses; the base class takes it as an option
    default_quant_type: ClassVar[str] = "nf4"

    def __init__(self, blocksize: int = 64, quant_type: str | None = None) -> None:
        super().__init__()
        quant_type = quant_type or self.default_quant_type
        if quant_type not in ("nf4", "fp4"):
            raise TypeError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize not in _BLOCKSIZES:
            raise TypeError(f"blocksize must be one of {list(_BLOCKSIZES)}, got {blocksize!r}")
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self._codes: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quant_type={self.quant_type!r}, blocksize={self.blocksize})"

    def _padded(self, row: int) -> int:
        return math.ceil(row / self.blocksize) * self.blocksize

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        lead, row = _rows(shape)
        padded = self._padded(row)
        return {
            "packed": ((*lead, padded // 2), torch.uint8),
            "absmax": ((*lead, padded // self.blocksize), torch.float32),
        }

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lead, row = _rows(tuple(x.shape))
        padded = self._padded(row)
        rows = x.reshape(-1, row)
        if rows.dtype not in _NATIVE:
            rows = rows.float()
        if padded != row:
            rows = F.pad(rows, (0, padded - row))
        packed, state = bnbf().quantize_4bit(
            rows.contiguous(), blocksize=self.blocksize, quant_type=self.quant_type, compress_statistics=False
        )
        return {
            "packed": packed.reshape(*lead, padded // 2),
            "absmax": state.absmax.float().reshape(*lead, padded // self.blocksize),
        }

    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        lead, row = _rows(tuple(shape))
        padded = self._padded(row)
        n_rows = math.prod(lead)
        packed = parts["packed"].reshape(-1, 1).contiguous()
        device = packed.device
        state = bnbf().QuantState(
            absmax=parts["absmax"].reshape(-1).float().contiguous(),
            shape=torch.Size((n_rows, padded)),
            code=self._code(device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype if dtype in _NATIVE else torch.float32,
        )
        rows = bnbf().dequantize_4bit(packed, state)
        return rows[:, :row].reshape(shape).to(dtype)

    def _code(self, device: torch.device) -> torch.Tensor:
        """The 16-entry code book, built once per device (it is a constant of quant_type)."""
        if device not in self._codes:
            self._codes[device] = bnbf().get_4bit_type(self.quant_type, device=device)
        return self._codes[device]


class BnbNF4(BitsAndBytes4bit):
    """NormalFloat4 (QLoRA's data type for normally distributed weights), block-wise absmax."""

    default_quant_type = "nf4"

    def __init__(self, blocksize: int = 64) -> None:
        super().__init__(blocksize=blocksize)


class BnbFP4(BitsAndBytes4bit):
    """4-bit floating point (1 sign, 2 exponent, 1 mantissa bit), block-wise absmax."""

    default_quant_type = "fp4"

    def __init__(self, blocksize: int = 64) -> None:
        super().__init__(blocksize=blocksize)


class BnbInt8(Compressor):
    """bitsandbytes' LLM.int8() row-wise absmax quantization (no outlier decomposition).

    Parts: ``data`` (*shape) int8 and ``scale`` (*leading, 1) float32 (the row's absmax), so
    8 bits per value plus 32 per row. On CUDA bitsandbytes quantizes only float16 input, so
    other dtypes are cast to float16 there first; on the CPU every dtype is quantized from
    float32.
    """

    def __repr__(self) -> str:
        return "BnbInt8()"

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        lead, row = _rows(shape)
        return {"data": ((*lead, row), torch.int8), "scale": ((*lead, 1), torch.float32)}

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lead, row = _rows(tuple(x.shape))
        rows = x.reshape(-1, row)
        # bitsandbytes' CUDA kernel takes float16 only. Its portable (CPU) kernel computes in
        # the input's dtype, where bfloat16's 8-bit mantissa would add rounding error of the
        # size of the int8 step itself, so it gets float32.
        rows = rows.half() if rows.device.type == "cuda" else rows.float()
        data, scale, _ = bnbf().int8_vectorwise_quant(rows.contiguous())
        # An all-zero row has absmax 0; bitsandbytes' portable kernel then computes 0/0.
        data = data.masked_fill(scale[:, None] == 0, 0)
        return {"data": data.reshape(*lead, row), "scale": scale.float().reshape(*lead, 1)}

    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        lead, row = _rows(tuple(shape))
        data = parts["data"].reshape(-1, row).contiguous()
        scale = parts["scale"].reshape(-1).float().contiguous()
        return bnbf().int8_vectorwise_dequant(data, scale).reshape(shape).to(dtype)


def cpu_support() -> str | None:
    """None when this bitsandbytes quantizes NF4, FP4 and int8 on the CPU; else why not.

    bitsandbytes' CPU path depends on its version and build, so tests (and users) ask
    instead of assuming; the answer is the exact error bitsandbytes raised.
    """
    import bitsandbytes

    x = torch.linspace(-1.0, 1.0, 128).reshape(2, 64)
    try:
        for compressor in (BnbNF4(), BnbFP4(), BnbInt8()):
            y = compressor.decompress(compressor.compress(x), (2, 64), torch.float32)
            if not torch.allclose(y, x, atol=0.2):
                return f"bitsandbytes {bitsandbytes.__version__}: {compressor!r} round trip on the CPU is wrong"
    except Exception as exc:  # any failure inside bitsandbytes means "not on this CPU"
        return f"bitsandbytes {bitsandbytes.__version__} cannot quantize on the CPU here: {type(exc).__name__}: {exc}"
    return None
