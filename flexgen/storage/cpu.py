"""Host memory, page-locked (pinned) when CUDA exists so copies to the GPU run asynchronously."""

import torch

from flexgen.storage.base import StorageBackend


class CPUStorage(StorageBackend):
    """Tensors in host memory."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tensors: dict[str, torch.Tensor] = {}
        self._pin = self.pin_memory and torch.cuda.is_available()

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if self._pin:
            resident = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            resident.copy_(tensor)
        else:
            resident = tensor.detach().to("cpu", copy=True).contiguous()
        self._tensors[key] = resident
        return resident

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        resident = torch.zeros(shape, dtype=dtype, pin_memory=self._pin)
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
