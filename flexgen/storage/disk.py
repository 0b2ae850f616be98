"""Disk: tensors in files under the offload directory, read through memory maps.

Weights are kept as one safetensors file per tensor, written atomically (a unique temporary
name, then a rename), so an interrupted conversion leaves no half-written file under a real
name and two processes writing the same tensor cannot corrupt it. They persist across runs.

Tensors made with :meth:`DiskStorage.empty` (the KV cache, activations) are raw files mapped
shared, so writing a token's keys and values writes those bytes of the file in place, never
the whole cache. They are deleted when freed.

Reads go through the page cache: a memory-mapped tensor costs file-backed pages, not
anonymous memory, so a process can stream a model far larger than its RAM.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from flexgen.errors import CheckpointError
from flexgen.storage.base import StorageBackend

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a safetensors file (copy-on-write, so never written back).

    Raises CheckpointError naming the file when it is truncated or its header is corrupt.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if data_start + end > size:
            raise ValueError(f"file is {size} bytes, its header says {data_start + end}")
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc})") from exc
    tensors = {}
    if end == 0:
        return {name: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]]) for name, info in header.items()}
    raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=data_start, shape=(end,)))
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        tensors[name] = raw[begin:stop].view(dtype).reshape(info["shape"])
    return tensors


class DiskStorage(StorageBackend):
    """Tensors in files under ``offload_dir``."""

    persistent = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.offload_dir is None:
            raise TypeError("the disk tier needs an offload_dir")
        self._tensors: dict[str, torch.Tensor] = {}
        self._scratch: dict[str, Path] = {}  # files made by empty(), deleted when freed

    def _path(self, key: str, suffix: str) -> Path:
        return self.offload_dir / f"{key}{suffix}"

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        path = self._path(key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            save_file({"data": tensor.detach().to("cpu").contiguous()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        resident = map_safetensors(path)["data"]
        self._tensors[key] = resident
        return resident

    def fetch(self, resident: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        """On the CPU, the mapped tensor itself; to a GPU, through a pinned staging buffer.

        The read from the page cache into pinned memory runs on the calling (I/O) thread, and
        the copy to the GPU is then asynchronous. PyTorch's caching host allocator recycles the
        staging buffers once their copies are done.
        """
        if device.type != "cuda":
            return resident.to(device)
        staging = torch.empty(resident.shape, dtype=resident.dtype, pin_memory=True)
        staging.copy_(resident)
        return staging.to(device, non_blocking=non_blocking)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._tensors:
            return self._tensors[key]
        path = self._path(key, ".safetensors")
        if not path.exists():
            return None
        try:
            resident = map_safetensors(path)["data"]
        except (CheckpointError, KeyError):
            path.unlink(missing_ok=True)  # damaged: the caller will write it again
            return None
        self._tensors[key] = resident
        return resident

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        path = self._path(key, ".bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with open(path, "wb") as f:
            f.truncate(nbytes)  # sparse, zero-filled
        raw = torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)
        resident = raw[:nbytes].view(dtype).reshape(shape)
        self._tensors[key] = resident
        self._scratch[key] = path
        return resident

    def free(self, key: str) -> None:
        self._tensors.pop(key, None)
        path = self._scratch.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        for key in list(self._scratch):
            self.free(key)
        self._tensors.clear()
