"""Sizes of tensors, and handing memory the allocator freed back to the operating system.

Small helpers every room of the engine uses: counting bytes by shape and dtype without
allocating, and ``malloc_trim`` after a conversion frees tensors (glibc only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc only; elsewhere a no-op).

    Converting a model tensor by tensor frees a few tens of megabytes per tensor, which glibc
    keeps in its heap; without this a 100 %-on-disk conversion ends holding a third of the
    model in anonymous memory it no longer uses.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - present on glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
