"""Compute-device memory: tensors already where the model computes.

On a machine without CUDA the compute device is the CPU, and this tier is plain host memory
that the model uses in place.
"""

import torch

from flexgen.storage.base import StorageBackend


class GPUStorage(StorageBackend):
    """Tensors resident on the compute device."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        # empty_like keeps the caller's memory layout (e.g. a column-major matrix).
        resident = torch.empty_like(tensor, device=self.compute_device)
        resident.copy_(tensor.detach())
        self._tensors[key] = resident
        return resident

    def adopt(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.compute_device:
            return self.put(key, tensor)
        self._tensors[key] = tensor.detach()
        return self._tensors[key]

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        resident = torch.zeros(shape, dtype=dtype, device=self.compute_device)
        self._tensors[key] = resident
        return resident

    def get(self, key: str) -> torch.Tensor | None:
        return self._tensors.get(key)

    def free(self, key: str) -> None:
        self._tensors.pop(key, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        self._tensors.clear()
