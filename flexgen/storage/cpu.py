"""Host memory, page-locked (pinned) when the compute device is a GPU, so copies run asynchronously.

Pinning goes through ``cudaHostRegister`` on an ordinary allocation rather than PyTorch's
pinned allocator, which rounds every block up to a power of two: a 374 MB cache unit of
OPT-30B would take 512 MB of RAM, and RAM is what an offloading run is short of. It also lets
a tensor the engine made on the host be pinned where it is (:meth:`CPUStorage.adopt`), with
no copy. Two CUDA rules shape this file:

* A failed ``cudaHostRegister`` leaves the CUDA runtime's per-thread *last error* set, and
  PyTorch checks that error after its next kernel launch, which would then fail with an
  unrelated message. So the error is cleared at once with ``cudaGetLastError`` of the runtime
  PyTorch loaded; where that runtime cannot be reached, ``cudaHostRegister`` is not used at
  all, and tensors are pinned by PyTorch's allocator instead.
* Unregistering memory that a copy still reads or writes is undefined, and so is freeing it.
  Before a registered tensor is let go, the backend waits for the device to finish its work.
  That is a device-wide wait, affordable because the engine frees host tensors rarely: its KV
  cache is allocated once per engine and reused by every block.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from flexgen.storage.base import StorageBackend


@functools.lru_cache(maxsize=None)
def _get_last_error():
    """``cudaGetLastError`` of the CUDA runtime this process loaded, or None when it cannot be found."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libcudart"):
                    paths.append(path)
    except OSError:
        pass
    for library in [*dict.fromkeys(paths), None]:  # None: symbols loaded globally (RTLD_GLOBAL)
        try:
            function = ctypes.CDLL(library).cudaGetLastError
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_int
        return function
    return None


def register(tensor: torch.Tensor) -> bool:
    """Page-lock ``tensor``'s memory in place; False (and no CUDA error left behind) when CUDA refuses."""
    get_last_error = _get_last_error()
    if get_last_error is None:
        return False
    storage = tensor.untyped_storage()
    code = torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
    if int(code) != 0:
        get_last_error()  # clear it: PyTorch would report it after its next kernel launch
        return False
    return True


def unregister(tensor: torch.Tensor) -> None:
    """Undo :func:`register`; the caller has made sure no copy still uses the memory."""
    code = torch.cuda.cudart().cudaHostUnregister(tensor.untyped_storage().data_ptr())
    if int(code) != 0:
        _get_last_error()()


class CPUStorage(StorageBackend):
    """Tensors in host memory."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tensors: dict[str, torch.Tensor] = {}
        self._registered: set[str] = set()  # keys whose memory we page-locked ourselves
        self._pin = self.pin_memory and self.compute_device.type == "cuda" and torch.cuda.is_available()

    def _keep(self, key: str, resident: torch.Tensor) -> torch.Tensor:
        """Hold ``resident`` under ``key``, page-locked when pinning is on."""
        if self._pin and resident.numel() and not resident.is_pinned():
            if register(resident):
                self._registered.add(key)
            else:
                resident = resident.pin_memory()
        self._tensors[key] = resident
        return resident

    def _allocate(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
        self.free(key)
        return self._keep(key, (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype))

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        resident = self._tensors.get(key)
        if resident is None or resident.shape != tensor.shape or resident.dtype != tensor.dtype:
            # Page-locking is slow; a key put again with the same shape (hidden states parked
            # between tasks) keeps its memory.
            resident = self._allocate(key, tuple(tensor.shape), tensor.dtype, zeroed=False)
        resident.copy_(tensor.detach())
        return resident

    def adopt(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu":
            return self.put(key, tensor)
        self.free(key)
        return self._keep(key, tensor.detach())

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._allocate(key, shape, dtype, zeroed=True)

    def get(self, key: str) -> torch.Tensor | None:
        return self._tensors.get(key)

    def free(self, key: str) -> None:
        resident = self._tensors.pop(key, None)
        if key in self._registered:
            self._registered.discard(key)
            torch.cuda.synchronize(self.compute_device)  # no copy may still use the memory
            unregister(resident)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        if self._registered:
            torch.cuda.synchronize(self.compute_device)
        for key in list(self._tensors):
            self.free(key)
