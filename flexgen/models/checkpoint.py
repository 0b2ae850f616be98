"""Where weights come from: an HF checkpoint directory, or seeded synthetic weights.

A *weight source* answers one question, "give me tensor ``name`` on the CPU", one tensor at a
time, so the engine can place a model far larger than memory tensor by tensor. Safetensors
files are memory-mapped (file-backed pages, no anonymous copy); ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``, which executes no pickled code. Synthetic
weights are generated per tensor from a seed derived from its name, so they do not depend on
placement or order.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from pathlib import Path
from typing import Protocol

import torch

from flexgen.errors import CheckpointError
from flexgen.models.opt import OPT_SIZES, OPTSpec, WeightSpec, spec_for_size
from flexgen.storage.disk import map_safetensors

_PREFIXES = ("model.decoder.", "decoder.", "model.")


class WeightSource(Protocol):
    """Hands out one weight tensor at a time, on the device that asks for it."""

    spec: OPTSpec
    #: True when ``get`` returns a new tensor each time, which the caller owns; False when it
    #: may return a view of the checkpoint's files (a memory map), which must be copied to keep
    fresh: bool

    def fingerprint(self) -> str:
        """Changes whenever any tensor would change; names converted copies on disk."""

    def get(self, weight: WeightSpec, device: torch.device | str = "cpu", column_major: bool = False) -> torch.Tensor:
        """The tensor for ``weight`` on ``device``, in any dtype (the caller casts).

        ``column_major``: a 2-D tensor laid out transposed in memory (strides ``(1, rows)``),
        which the engine prefers for CPU matrix products with few rows.
        """


def _normalise(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class HFCheckpoint:
    """A local HF transformers checkpoint directory of an OPT model."""

    fresh = False  # tensors are views of memory-mapped files

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: not an HF checkpoint (no config.json)")
        try:
            self._config_bytes = config_path.read_bytes()
            config = json.loads(self._config_bytes)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
        self.spec = OPTSpec.from_hf_config(config, name=str(self.path))
        self.files = self._weight_files()
        self._index: dict[str, Path] = {}
        self._opened: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self.files:
            for key in self._keys(file):
                self._index.setdefault(_normalise(key), file)

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.path / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as exc:
                    raise CheckpointError(f"{index_path}: unreadable shard index ({exc})") from exc
                files = sorted({self.path / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index_path}: shard {missing[0]} is missing")
                return files
        for pattern in ("*.safetensors", "*.bin"):
            files = sorted(self.path.glob(pattern))
            if files:
                return files
        raise CheckpointError(f"{self.path}: no weight files (*.safetensors or *.bin)")

    def _open(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._opened:
            if file.suffix == ".safetensors":
                tensors = map_safetensors(file)
            else:
                try:
                    tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # torch raises many kinds for a damaged or unsafe file
                    raise CheckpointError(f"{file}: truncated, corrupt or unsafe weight file ({type(exc).__name__})") from exc
                if not isinstance(tensors, dict):
                    raise CheckpointError(f"{file}: not a state dict")
            self._opened[file] = tensors
        return self._opened[file]

    def _keys(self, file: Path) -> list[str]:
        return list(self._open(file))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self._config_bytes)
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]

    def get(self, weight: WeightSpec, device: torch.device | str = "cpu", column_major: bool = False) -> torch.Tensor:
        name = weight.name
        if name == "lm_head.weight" and name not in self._index:
            name = "embed_tokens.weight"  # tied output embedding
        if name not in self._index:
            raise CheckpointError(f"{self.path}: weight {weight.name!r} is missing from the checkpoint")
        tensor = self._open(self._index[name])[_original_key(self._open(self._index[name]), name)]
        if tuple(tensor.shape) != weight.shape:
            raise CheckpointError(
                f"{self._index[name]}: weight {name!r} has shape {tuple(tensor.shape)}, config.json implies {weight.shape}"
            )
        tensor = tensor.to(device)
        return tensor.t().contiguous().t() if column_major and tensor.dim() == 2 else tensor


def _original_key(tensors: dict[str, torch.Tensor], name: str) -> str:
    for prefix in ("",) + _PREFIXES:
        if prefix + name in tensors:
            return prefix + name
    raise KeyError(name)


class SyntheticWeights:
    """Seeded synthetic weights of any OPT shape, made at memory speed: the benchmarks' model.

    Benchmarks place tens of gigabytes of these (OPT-30B is 60 GB in float16); drawing every
    value from a random generator runs at ~150 M values/s per thread, minutes per workload.
    Instead one *table* of N(0, 0.02²) values (OPT's initialisation) is drawn per seed, a few
    megabytes, and every matrix is cut from it as a strided view, so making a tensor is one
    copy at memory speed, on whatever device it will live:

    element (i, j) of tensor ``name`` = ``table[b + (i // 64) * 1031 + i % 64 + j]``,
    ``b`` from a hash of (seed, name).

    The values do not depend on the device, the memory layout asked for, placement or order
    (the table is drawn on the CPU and only copied), so one seed gives the same weights on a
    laptop and on a GPU. Rows within a group of 64 are shifted windows of the table: fine for
    measuring speed, which is all synthetic weights are for. Biases are zero, layer-norm gains one.
    """

    #: bump when the values change, so that converted copies on disk are not reused
    FILL_VERSION = 2
    fresh = True

    def __init__(self, spec: OPTSpec, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
        self.spec = spec
        self.seed = seed
        self.dtype = dtype
        self._tables = _SeededTable(seed, dtype)

    def fingerprint(self) -> str:
        text = json.dumps([self.spec.to_dict(), self.seed, str(self.dtype), self.FILL_VERSION], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def get(self, weight: WeightSpec, device: torch.device | str = "cpu", column_major: bool = False) -> torch.Tensor:
        out = _empty(weight.shape, self.dtype, device, column_major)
        if weight.init == "zeros":
            return out.zero_()
        if weight.init == "ones":
            return out.fill_(1.0)
        rows, cols = _as_matrix(weight.shape)
        offset = zlib.crc32(f"{self.seed}:{weight.name}".encode()) % _TABLE_OFFSETS
        groups, tail = divmod(rows, _ROW_GROUP)
        need = offset + groups * _GROUP_STRIDE + _ROW_GROUP + cols
        table = self._tables.get(need, out.device)
        matrix = out.view(rows, cols) if out.dim() != 2 else out
        if groups:
            matrix[: groups * _ROW_GROUP].view(groups, _ROW_GROUP, cols).copy_(
                table.as_strided((groups, _ROW_GROUP, cols), (_GROUP_STRIDE, 1, 1), offset)
            )
        if tail:
            matrix[groups * _ROW_GROUP:].copy_(
                table.as_strided((tail, cols), (1, 1), offset + groups * _GROUP_STRIDE)
            )
        return out


_ROW_GROUP = 64  # rows cut as consecutive windows of the table
_GROUP_STRIDE = 1031  # table offset between groups of rows (a prime, > _ROW_GROUP)
_TABLE_OFFSETS = 1 << 20  # each tensor starts at a hashed offset below this
_TABLE_CHUNK = 1 << 20  # the table grows in chunks, each drawn from its own seeded generator


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = shape[-1] if shape else 1
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, cols


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device, column_major: bool) -> torch.Tensor:
    if column_major and len(shape) == 2:
        return torch.empty_strided(shape, (1, shape[0]), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _SeededTable:
    """The random table of one seed, grown on demand, with a cast copy per device (thread-safe).

    Chunk ``c`` holds values drawn by a generator seeded from (seed, c), so growing the table
    never changes a value already handed out.
    """

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.seed, self.dtype = seed, dtype
        self._values = torch.empty(0, dtype=torch.float32)
        self._copies: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, length: int, device: torch.device) -> torch.Tensor:
        with self._lock:
            if self._values.numel() < length:
                chunks = [self._values]
                for c in range(self._values.numel() // _TABLE_CHUNK, -(-length // _TABLE_CHUNK)):
                    generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:table:{c}".encode()))
                    chunks.append(torch.empty(_TABLE_CHUNK).normal_(0.0, 0.02, generator=generator))
                self._values = torch.cat(chunks)
                self._copies.clear()
            copy = self._copies.get(device)
            if copy is None:
                copy = self._copies[device] = self._values.to(self.dtype).to(device)
            return copy


def open_source(model: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> WeightSource:
    """An HF checkpoint directory, or synthetic weights for an OPT size name."""
    path = Path(model)
    if path.is_dir():
        return HFCheckpoint(path)
    name = str(model).lower().removeprefix("facebook/")
    if name in OPT_SIZES:
        return SyntheticWeights(spec_for_size(name), seed=seed, dtype=dtype)
    raise CheckpointError(
        f"{model}: neither a checkpoint directory nor an OPT size ({', '.join(OPT_SIZES)})"
    )
