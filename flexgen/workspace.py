"""Scratch memory reused across calls: the hot loops' answer to allocating per call.

A decode step calls attention (and decompression) once per (layer, GPU batch), hundreds of
times a second, on tensors of the same few sizes. Allocating their temporaries afresh every
call costs page faults on the host (large allocations come straight from the kernel, zeroed,
one fault per 4 KiB page) and allocator churn on the GPU. A :class:`Workspace` keeps one flat
buffer per (name, device, dtype), grows it when a larger request comes and otherwise hands out
views of it, so the steady state allocates nothing.

Buffers are per thread (``threading.local``): a backend instance may be called from the
engine's main thread and from a worker thread at once, and neither may see the other's
scratch. A view is valid until the next request of the same name on the same thread.
"""

from __future__ import annotations

import threading
from math import prod

import torch


class Workspace:
    """Named flat buffers, one per (name, device, dtype) and thread, grown on demand."""

    def __init__(self) -> None:
        self._local = threading.local()

    # Scratch is not state: a pickled or copied workspace starts empty (and its owner, a
    # backend, stays picklable, as plugins were before they had workspaces).
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _buffers(self) -> dict[tuple[str, torch.device, torch.dtype], torch.Tensor]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        return buffers

    def flat(self, name: str, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A 1-D view of ``numel`` elements of the buffer ``name`` (contents undefined)."""
        device = torch.device(device)
        key = (name, device, dtype)
        buffers = self._buffers()
        buffer = buffers.get(key)
        if buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled():
            buffer = None  # made under inference_mode (the engine's generate): unusable outside it
        if buffer is None or buffer.numel() < numel:
            buffers.pop(key, None)  # let go of the old buffer before allocating its successor
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A contiguous tensor of ``shape`` in the buffer ``name`` (contents undefined)."""
        return self.flat(name, prod(shape), dtype, device).view(shape)

    def empty_like_layout(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor shaped like ``like`` whose axes lie in memory in the order of ``like``'s strides.

        Copying a strided view of the cache into it then runs over long contiguous stretches
        on both sides (a (B, H, t, D) view of a (T, B, H, D) cache gets a (t, B, H, D) buffer),
        and the copy's destination can be used with the same axis order as its source.
        """
        order = sorted(range(like.dim()), key=lambda axis: (-like.stride(axis), axis))
        shape = tuple(like.shape[axis] for axis in order)
        buffer = self.empty(name, shape, dtype, like.device)
        inverse = [order.index(axis) for axis in range(like.dim())]
        return buffer.permute(inverse)

    def nbytes(self) -> int:
        """Bytes held by this thread's buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers().values())

    def clear(self) -> None:
        """Release this thread's buffers."""
        self._buffers().clear()
