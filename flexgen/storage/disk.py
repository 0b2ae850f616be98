"""Disk: tensors in files under the offload directory, read through memory maps.

Weights are kept as one safetensors file per tensor. Each is written under a temporary name
in this process's scratch folder and renamed into place, so an interrupted conversion leaves
no half-written file under a real name and two processes writing the same tensor cannot
corrupt it. They persist across runs.

A converted file is trusted only once verified: its header must name the key it was written
for (a file swapped for another is caught) and the CRC-32 of its data, written into the header
at conversion, must match the bytes on disk (flipped bytes are caught, not only truncation).
The check runs when a process first maps the file (:meth:`DiskStorage.get`), costs one read of
the file (about what reading the weights once costs; see docs/benchmarks.md for the measured
ratio), and a file that fails it is deleted with a one-line notice, so the engine converts it
again.

Tensors made with :meth:`DiskStorage.empty` (the KV cache, activations) are raw files in this
process's scratch folder, mapped shared, so writing a token's keys and values writes those
bytes of the file in place, never the whole cache. Their blocks are allocated up front, so a
full disk is an error at allocation, not a crash (SIGBUS) in the middle of a step. They are
deleted when freed.

The scratch folder, ``<offload_dir>/scratch/<pid>-<random>/``, is owned through a lock file
(:mod:`flexgen.scratch`): a run that is killed leaves it behind, and the next process that
opens a disk tier on the same offload folder removes it, never one whose owner still runs.

Reads go through the page cache: a memory-mapped tensor costs file-backed pages, not
anonymous memory, so a process can stream a model far larger than its RAM.

A model larger than the memory the page cache may use would thrash it: read in layer order
every step, each layer evicts one that is needed soon, and every step reads the whole model
from the disk. So the tier keeps a share of the available memory (``page_cache_fraction``,
measured when the engine first releases a weight) for the weights used first, and gives the
pages of every other weight back as soon as the engine releases it (:meth:`DiskStorage.release`):
a step then reads from the disk only what does not fit, and the kept layers never compete with
the streamed ones. A model that fits keeps everything, as before.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from flexgen.errors import CheckpointError, StorageError
from flexgen.scratch import OwnedFolder, sweep
from flexgen.storage.base import StorageBackend

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

#: Bytes between the bytes :meth:`DiskStorage._bring_in` touches: one per page of memory.
_PAGE = 4096

#: safetensors' own limit on the header: a larger claim is refused before anything is read.
MAX_HEADER_BYTES = 100_000_000

#: header metadata written at conversion and checked before reuse
KEY_FIELD, CRC_FIELD = "flexgen.key", "flexgen.crc32"

#: Share of the available memory the page cache may keep of the weights on disk (see the module
#: docstring): the rest of memory stays for the cache, activations, buffers and other programs.
PAGE_CACHE_FRACTION = 0.6


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: every entry's dtype, shape and byte range are consistent."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: dict[str, str]
    data_start: int  # file offset of the first data byte
    data_len: int


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file; CheckpointError naming the file and the fault.

    Checked, as the safetensors library itself does: the 8-byte length (at most 100 MB, and
    inside the file: a claim of gigabytes is refused before it is read), UTF-8 JSON whose top
    level is an object, ``__metadata__`` a map of strings, each entry's dtype known, its shape a
    list of non-negative integers, its offsets a pair inside the data that holds exactly
    ``prod(shape) x itemsize`` bytes, the entries packed without holes or overlaps and the file
    ending with the last one.
    """

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt safetensors file ({reason})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise bad(f"its header claims {header_len} bytes, more than safetensors allows ({MAX_HEADER_BYTES})")
            if header_len > size - 8:
                raise bad(f"its header claims {header_len} bytes, the file has {size - 8} after the length")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"its header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ is not a map of strings")
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise bad(f"entry {name!r} has unsupported dtype {dtype_name!r} (supported: {', '.join(_SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"entry {name!r} has shape {shape!r}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"entry {name!r} has data_offsets {offsets!r}, not a pair [begin, end] of byte offsets")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"entry {name!r}: shape {shape} of {dtype_name} is {nbytes} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]}")
        tensors[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    end = 0
    for name, (_, _, begin, stop) in sorted(tensors.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != end:
            raise bad(f"entry {name!r} starts at byte {begin} of the data, expected {end} (a hole or an overlap)")
        end = stop
    data_start = 8 + header_len
    if data_start + end != size:
        raise bad(f"file is {size} bytes, its header says {data_start + end}")
    return SafetensorsHeader(tensors, metadata, data_start, end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _raw(path: Path, header: SafetensorsHeader) -> torch.Tensor:
    """The data bytes of a checked file, memory-mapped copy-on-write (so never written back)."""
    if header.data_len == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=header.data_start,
                                      shape=(header.data_len,)))


def map_safetensors(path: Path, header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a safetensors file (copy-on-write, so never written back).

    Raises CheckpointError naming the file when it is truncated or its header is corrupt.
    """
    header = header if header is not None else read_header(path)
    try:
        raw = _raw(path, header)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot map it ({exc})") from exc
    return {name: raw[begin:stop].view(dtype).reshape(shape) for name, (dtype, shape, begin, stop) in header.tensors.items()}


def _crc32(data: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (zlib releases the GIL, so placement threads check in parallel)."""
    flat = data.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy())


class DiskStorage(StorageBackend):
    """Tensors in files under ``offload_dir``."""

    persistent = True

    def __init__(self, page_cache_fraction: float = PAGE_CACHE_FRACTION, **kwargs) -> None:
        """``page_cache_fraction``: the share of available memory that weights on disk may keep
        in the page cache between uses when the model does not fit in it (0 to 1; 0 keeps none)."""
        super().__init__(**kwargs)
        if self.offload_dir is None:
            raise TypeError("the disk tier needs an offload_dir")
        if (isinstance(page_cache_fraction, bool) or not isinstance(page_cache_fraction, (int, float))
                or not 0 <= page_cache_fraction <= 1):
            raise TypeError(f"page_cache_fraction must be a number from 0 to 1, got {page_cache_fraction!r}")
        self.page_cache_fraction = float(page_cache_fraction)
        self._page_cache_budget: int | None = None  # bytes; set at the first release
        self._kept: dict[int, bool] = {}  # data_ptr -> whether its pages stay cached between uses
        self._kept_bytes = 0
        if self.offload_dir.exists() and not self.offload_dir.is_dir():
            raise StorageError(f"output.offload_dir: {self.offload_dir} is not a folder")
        self._tensors: dict[str, torch.Tensor] = {}
        self._extents: dict[int, tuple[Path, int, int]] = {}  # data_ptr -> (file, offset, bytes); see _bring_in
        self._scratch: dict[str, Path] = {}  # files made by empty(), deleted when freed
        # Scratch of runs that were killed; ours is made on first use and removed by close().
        sweep(self.offload_dir / "scratch")
        self._owned = OwnedFolder(self.offload_dir / "scratch")

    def _path(self, key: str, suffix: str) -> Path:
        return self.offload_dir / f"{key}{suffix}"

    def _failed(self, what: str, exc: BaseException) -> StorageError:
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return StorageError(f"output.offload_dir: cannot write {what} under {self.offload_dir} ({reason})")

    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        path = self._path(key, ".safetensors")
        data = tensor.detach().to("cpu").contiguous()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._owned.path / f"{uuid.uuid4().hex}.safetensors"
            save_file({"data": data}, str(tmp), metadata={KEY_FIELD: key, CRC_FIELD: str(_crc32(data))})
            os.replace(tmp, path)
        except Exception as exc:  # OSError, or safetensors' own error for a full disk
            raise self._failed(key, exc) from exc
        resident = map_safetensors(path)["data"]
        self._tensors[key] = resident
        self._remember_extent(path, resident)
        return resident

    def fetch(self, resident: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        """On the CPU, the mapped tensor itself; to a GPU, through a pinned staging buffer.

        The read from the page cache into pinned memory runs on the calling (I/O) thread, and
        the copy to the GPU is then asynchronous. PyTorch's caching host allocator recycles the
        staging buffers once their copies are done.
        """
        if device.type != "cuda":
            self._bring_in(resident)
            return resident.to(device)
        staging = torch.empty(resident.shape, dtype=resident.dtype, pin_memory=True)
        staging.copy_(resident)
        return staging.to(device, non_blocking=non_blocking)

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor stored under ``key``, verified on its first use in this process; None if absent or damaged."""
        if key in self._tensors:
            return self._tensors[key]
        path = self._path(key, ".safetensors")
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"output.offload_dir: cannot read {path} ({exc.strerror or exc})") from exc
        try:
            header = read_header(path)
            resident = self._verified(key, path, header)
        except CheckpointError as exc:
            log.warning("%s; converting it again", str(exc))
            try:
                if path.stat().st_ino == stat.st_ino:  # not a good copy another process has just renamed in
                    path.unlink()
            except OSError:
                pass
            return None
        self._tensors[key] = resident
        self._remember_extent(path, resident)
        return resident

    def _remember_extent(self, path: Path, resident: torch.Tensor) -> None:
        """Where a mapped tensor's bytes lie in its file, for :meth:`_bring_in`."""
        if resident.numel() == 0:
            return
        header = read_header(path)
        begin = header.tensors["data"][2]
        self._extents[resident.data_ptr()] = (path, header.data_start + begin, resident.numel() * resident.element_size())

    def _bring_in(self, resident: torch.Tensor) -> None:
        """Read a mapped tensor's pages from the disk now, on the calling thread (the engine's I/O thread).

        On the CPU a fetch returns the mapped tensor itself; without this its pages would be
        read by page faults on the compute thread, in the middle of the products, a read-ahead
        window (128 KiB) at a time: reading layer j+1 would never overlap computing layer j. So
        the whole range is first handed to the kernel as one read-ahead request
        (``POSIX_FADV_WILLNEED``: large sequential reads, queued together), then one byte per
        page is touched, with numpy on this thread (no OpenMP team beside the compute
        thread's), which waits for the reads and maps the pages. Pages are the page cache's, not
        this process's heap: a model larger than RAM streams through, the kernel evicting the
        layers read longest ago.
        """
        extent = self._extents.get(resident.data_ptr())
        if extent is None:
            return
        path, offset, length = extent
        if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED"):  # Linux
            _advise(path, offset, length, os.POSIX_FADV_WILLNEED)  # the touch below reads the pages anyway
        flat = resident.reshape(-1).view(torch.uint8).numpy()
        np.bitwise_or.reduce(flat[::_PAGE])

    def release(self, resident: torch.Tensor) -> None:
        """Give a converted weight's pages back to the OS, unless it is one of those kept cached.

        The weights released first are kept, as long as they fit in the budget
        (``page_cache_fraction`` of the memory available at the first release): they are the
        first layers, read again first at the next step. Any other weight's pages are unmapped
        from this process (``MADV_DONTNEED``; the mapping is copy-on-write and never written,
        so the next access reads the file again) and dropped from the page cache
        (``POSIX_FADV_DONTNEED``), so reading the next layers evicts nothing that is kept.
        Only whole pages inside the tensor are dropped. Linux only; elsewhere nothing is done.
        """
        extent = self._extents.get(resident.data_ptr())
        if extent is None or not _CAN_DROP_PAGES:
            return
        path, offset, length = extent
        keep = self._kept.get(resident.data_ptr())
        if keep is None:
            if self._page_cache_budget is None:
                self._page_cache_budget = int(self.page_cache_fraction * available_memory())
            keep = self._kept_bytes + length <= self._page_cache_budget
            self._kept[resident.data_ptr()] = keep
            self._kept_bytes += length if keep else 0
        if not keep:
            drop_pages(resident.data_ptr(), length, path, offset)

    @property
    def kept_bytes(self) -> int:
        """Bytes of weights kept in the page cache between uses (those released so far)."""
        return self._kept_bytes

    @staticmethod
    def _verified(key: str, path: Path, header: SafetensorsHeader) -> torch.Tensor:
        """The ``data`` tensor of a converted file, once its header names ``key`` and its CRC-32 matches."""
        written_for, crc = header.metadata.get(KEY_FIELD), header.metadata.get(CRC_FIELD)
        if written_for is None or crc is None:
            raise CheckpointError(f"converted weight {path} carries no checksum (written by an older flexgen)")
        if written_for != key or set(header.tensors) != {"data"}:
            raise CheckpointError(f"converted weight {path} holds {written_for!r}, not {key!r}")
        resident = map_safetensors(path, header)["data"]
        if str(_crc32(resident)) != crc:
            raise CheckpointError(f"converted weight {path} is damaged (its bytes do not match the checksum "
                                  "written at conversion)")
        return resident

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        try:
            path = self._owned.path / f"{key}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                if nbytes and hasattr(os, "posix_fallocate"):
                    # Real blocks now: a sparse file on a full disk would fail later, as SIGBUS.
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                else:
                    f.truncate(nbytes)  # (no posix_fallocate, e.g. macOS: sparse, as before)
        except OSError as exc:
            raise self._failed(key, exc) from exc
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
        self._owned.release()


_CAN_DROP_PAGES = hasattr(os, "posix_fadvise") and hasattr(mmap, "MADV_DONTNEED")
_libc = ctypes.CDLL(None, use_errno=True) if _CAN_DROP_PAGES else None
if _libc is not None:
    _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _libc.madvise.restype = ctypes.c_int


def available_memory() -> int:
    """Bytes of memory available to new work without swapping (Linux's MemAvailable: free memory
    and the page cache that can be reclaimed)."""
    import psutil

    return int(psutil.virtual_memory().available)


def drop_pages(address: int, length: int, path: Path, offset: int) -> None:
    """Unmap the whole pages of ``length`` bytes at ``address`` (a private, never-written file
    mapping of ``path`` from ``offset``) and drop those bytes of the file from the page cache.

    Both are hints to the kernel; a failure of either only leaves the pages where they were.
    """
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        _libc.madvise(start, stop - start, mmap.MADV_DONTNEED)
    _advise(path, offset, length, os.POSIX_FADV_DONTNEED)


def _advise(path: Path, offset: int, length: int, advice: int) -> None:
    """``posix_fadvise`` on a byte range of a file: only a hint, so a failure is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, advice)
        finally:
            os.close(fd)
    except OSError:
        pass
