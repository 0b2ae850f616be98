"""Which dtype a model is stored in and computed in, on the device at hand.

``model.dtype`` names the dtype of the weights (what the disk and CPU tiers hold, what a
resumed job must match). ``auto``, the default, picks it for the device:

* on CUDA, ``float16`` (as before: every GPU computes it fast);
* on a CPU with native bfloat16 matrix instructions (x86 ``avx512_bf16`` or ``amx_bf16``,
  Arm ``bf16``), ``bfloat16``: half the bytes of float32, at least as fast;
* on any other CPU, ``float32``.

The *compute* dtype is the one the matrix products run in. On CUDA it is the model's dtype.
On a CPU that has no native instructions for the model's dtype, a half-precision model is
computed in float32 instead: PyTorch's bfloat16 and float16 products on such a CPU emulate
the format, measured 3-4x slower than float32 on the AVX2 development machine (and ~60x
slower with column-major weights). The weights then stay in the model's dtype where they are
stored away from compute (the cpu and disk tiers: half the bytes to read) and are converted
as each layer is used, while what compute memory holds (weights of the gpu tier, which on a
CPU-only machine is RAM, the KV cache and the activations) is kept in float32.

float16 is computed in float16 only with ``avx512_fp16`` / ``amx_fp16``; with bfloat16 alone it
is computed in float32, not bfloat16, whose 8-bit mantissa would lose three bits of each weight.

The CPU's flags come from ``/proc/cpuinfo`` (Linux); elsewhere none are known, so ``auto`` is
float32 on the CPU, which is always safe.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: what ``model.dtype`` accepts
DTYPE_CHOICES = ("auto",) + DTYPE_NAMES

_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # bf16: the Arm "Features" name
_FP16_FLAGS = {"avx512_fp16", "amx_fp16"}


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of the first CPU (x86 ``flags``, Arm ``Features``); empty when unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (read once)."""
    return read_cpu_flags()


def native_bf16(flags: frozenset[str] | set[str]) -> bool:
    """Whether the CPU multiplies bfloat16 matrices in hardware (AVX512-BF16, AMX-BF16, Arm BF16)."""
    return bool(_BF16_FLAGS & set(flags))


def native_fp16(flags: frozenset[str] | set[str]) -> bool:
    """Whether the CPU multiplies float16 matrices in hardware (AVX512-FP16, AMX-FP16)."""
    return bool(_FP16_FLAGS & set(flags))


def _device_type(device: object) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def resolve_dtype(name: str, device: object, flags: frozenset[str] | set[str] | None = None) -> str:
    """``model.dtype`` with ``auto`` replaced by its choice for ``device`` (see the module docstring)."""
    if name != "auto":
        return name
    if _device_type(device) == "cuda":
        return "float16"
    return "bfloat16" if native_bf16(cpu_flags() if flags is None else flags) else "float32"


def compute_dtype(name: str, device: object, flags: frozenset[str] | set[str] | None = None) -> str:
    """The dtype the matrix products of a ``name`` model run in on ``device`` (see the module docstring)."""
    name = resolve_dtype(name, device, flags)
    if _device_type(device) == "cuda" or name == "float32":
        return name
    flags = cpu_flags() if flags is None else flags
    if name == "bfloat16" and native_bf16(flags):
        return name
    if name == "float16" and native_fp16(flags):
        return name
    return "float32"


def describe(name: str, device: object, flags: frozenset[str] | set[str] | None = None) -> str:
    """``bfloat16, computed in float32 (no native bfloat16 on this CPU)``: for summaries."""
    computed = compute_dtype(name, device, flags)
    if computed == name:
        return name
    return f"{name}, computed in {computed} (no native {name} matrix instructions on this CPU)"
