"""Host memory, page-locked (pinned) when CUDA exists so copies to the GPU run asynchronously.

Pinning goes through ``cudaHostRegister`` on an ordinary allocation rather than PyTorch's
pinned allocator, which rounds every block up to a power of two: a 374 MB cache unit of
OPT-30B would take 512 MB of RAM, and RAM is what an offloading run is short of. If
registration fails, the tensor falls back to PyTorch's pinned allocator.
"""

import torch

from flexgen.storage.base import StorageBackend


def _register(tensor: torch.Tensor) -> bool:
    """Page-lock ``tensor``'s memory in place; False when CUDA refuses."""
    code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    return int(code) == 0


def _unregister(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


class CPUStorage(StorageBackend):
    """Tensors in host memory."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tensors: dict[str, torch.Tensor] = {}
        self._registered: set[str] = set()  # keys whose memory we page-locked ourselves
        self._pin = self.pin_memory and torch.cuda.is_available()

    def _allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
        self.free(key)
        resident = (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype)
        if self._pin and resident.numel():
            if _register(resident):
                self._registered.add(key)
            else:
                resident = resident.pin_memory()
        self._tensors[key] = resident
        return resident

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        resident = self._tensors.get(key)
        if resident is None or resident.shape != tensor.shape or resident.dtype != tensor.dtype:
            # Page-locking is slow; a key put again with the same shape (hidden states parked
            # between tasks) keeps its memory.
            resident = self._allocate(key, tuple(tensor.shape), tensor.dtype, zeroed=False)
        resident.copy_(tensor.detach())
        return resident

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._allocate(key, shape, dtype, zeroed=True)

    def get(self, key: str) -> torch.Tensor | None:
        return self._tensors.get(key)

    def free(self, key: str) -> None:
        resident = self._tensors.pop(key, None)
        if key in self._registered:
            self._registered.discard(key)
            _unregister(resident)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        for key in list(self._tensors):
            self.free(key)
