"""Where weights come from: an HF checkpoint directory, or seeded synthetic weights.

A *weight source* answers one question, "give me tensor ``name`` on the CPU", one tensor at a
time, so the engine can place a model far larger than memory tensor by tensor. Safetensors
files are memory-mapped (file-backed pages, no anonymous copy) after their header is checked;
``.bin`` files are opened with ``torch.load(weights_only=True)``, which executes no pickled
code: memory-mapped when they are in PyTorch's zip format, read into memory when they are in
its legacy (pre-1.6, non-zip) format, which cannot be mapped. Synthetic weights are generated
per tensor from a seed derived from its name, so they do not depend on placement or order.

Two fingerprints of a checkpoint folder, for two questions:

* :meth:`HFCheckpoint.fingerprint` names the converted copies of its weights under the offload
  folder. It covers the folder's resolved path, ``config.json`` and, per weight file, its name,
  size, modification time and a sample of its bytes, so another checkpoint never reuses these
  copies even when its file names, sizes and times are the same.
* :meth:`HFCheckpoint.content_fingerprint` says whether an output was made by the same model.
  It covers ``config.json`` and, per weight file, its name, size and the same byte sample, but
  not where the folder is or when it was written: a copied or moved checkpoint is the same
  model, a fine-tuned one (whose every tensor differs) is not.

The byte sample (the first and last 64 KiB of each file and 16 blocks of 4 KiB spread evenly
between them) costs a few dozen small reads per file, not a read of the weights.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Protocol

import torch

from flexgen.errors import CheckpointError
from flexgen.models.families import families, family_for_config
from flexgen.models.family import ModelFamily, ModelSpec, WeightSpec
from flexgen.storage.disk import map_safetensors

_PREFIXES = ("model.decoder.", "decoder.", "model.")


class WeightSource(Protocol):
    """Hands out one weight tensor at a time, on the device that asks for it."""

    spec: ModelSpec
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
    """A local HF transformers checkpoint directory of a model of any registered family.

    config.json's ``model_type`` chooses the family (:func:`~flexgen.models.families.family_for_config`),
    which reads the spec and names each weight's checkpoint keys.
    """

    fresh = False  # tensors are views of memory-mapped files

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: not an HF checkpoint (no config.json)")
        try:
            self._config_bytes = read_small(config_path)
            config = json.loads(self._config_bytes)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
        self.family: ModelFamily = family_for_config(config, name=str(self.path))
        self.spec = self.family.spec_from_hf_config(config, name=str(self.path))
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
                    weight_map = json.loads(read_small(index_path))["weight_map"]
                    names = set(weight_map.values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"{index_path}: unreadable shard index ({exc})") from exc
                odd = next((n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")), None)
                if odd is not None or not names:
                    raise CheckpointError(f"{index_path}: weight_map names {odd!r}, not a file of this folder")
                files = sorted(self.path / name for name in names)
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"{index_path}: shard {missing[0]} is missing")
                return files
        for pattern in ("*.safetensors", "*.bin"):
            files = sorted(f for f in self.path.glob(pattern) if f.is_file())
            if files:
                return files
        raise CheckpointError(f"{self.path}: no weight files (*.safetensors or *.bin)")

    def _open(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._opened:
            self._opened[file] = map_safetensors(file) if file.suffix == ".safetensors" else _load_bin(file)
        return self._opened[file]

    def _keys(self, file: Path) -> list[str]:
        return list(self._open(file))

    def fingerprint(self) -> str:
        """Names the converted copies of these weights: where, what and when (see the module docstring)."""
        digest = hashlib.sha256(str(self.path.resolve()).encode() + b"\0" + self._config_bytes)
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:{_sample_digest(file)}".encode())
        return digest.hexdigest()[:16]

    def content_fingerprint(self) -> str:
        """The same for the same model wherever it lies: config and sampled bytes (see the module docstring)."""
        digest = hashlib.sha256(self._config_bytes)
        for file in self.files:
            digest.update(f"{file.name}:{file.stat().st_size}:{_sample_digest(file)}".encode())
        return digest.hexdigest()[:16]

    def check(self) -> None:
        """Every weight the config implies is present with its shape: CheckpointError naming the first that is not."""
        for index in range(self.spec.num_model_layers):
            for weight in self.family.layer_weights(self.spec, index):
                self._lookup(weight)

    def _lookup(self, weight: WeightSpec) -> torch.Tensor:
        # The family's names for the weight, the first present wins (a tied head falls back to
        # the embedding), with the prefixes every family's checkpoints may carry taken off.
        names = [weight.name] + [_normalise(key) for key in self.family.checkpoint_names(self.spec, weight)]
        name = next((n for n in names if n in self._index), weight.name)
        if name not in self._index:
            raise CheckpointError(f"{self.path}: weight {weight.name!r} is missing from the checkpoint")
        tensors = self._open(self._index[name])
        tensor = tensors[_original_key(tensors, name)]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{self._index[name]}: {name!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != weight.shape:
            raise CheckpointError(
                f"{self._index[name]}: weight {name!r} has shape {tuple(tensor.shape)}, config.json implies {weight.shape}"
            )
        return tensor

    def get(self, weight: WeightSpec, device: torch.device | str = "cpu", column_major: bool = False) -> torch.Tensor:
        tensor = self._lookup(weight).to(device)
        return tensor.t().contiguous().t() if column_major and tensor.dim() == 2 else tensor


#: config.json and shard indexes are a few kilobytes (OPT-175B's index: ~100 kB); more is not one
MAX_JSON_BYTES = 16 << 20


def read_small(path: Path) -> bytes:
    """The bytes of a small JSON file of a checkpoint; CheckpointError (not a read of gigabytes) when it is not small."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, far more than a checkpoint's JSON file holds "
                              f"(at most {MAX_JSON_BYTES}); not read")
    return path.read_bytes()


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, without running pickled code; mapped when the format allows."""
    mappable = zipfile.is_zipfile(file)  # the zip format (PyTorch >= 1.6); the legacy one cannot be mapped
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as exc:  # torch raises many kinds for a damaged or unsafe file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{file}: truncated, corrupt or unsafe weight file ({type(exc).__name__}: {first})") from exc
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{file}: not a state dict")
    return tensors


_SAMPLE_EDGE, _SAMPLE_BLOCK, _SAMPLE_BLOCKS = 64 << 10, 4 << 10, 16


def _sample_digest(file: Path) -> str:
    """A digest of a file's size and a sample of its bytes: its ends and blocks spread between them."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        if size <= 2 * _SAMPLE_EDGE + _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
            digest.update(f.read())
        else:
            step = (size - 2 * _SAMPLE_EDGE) // (_SAMPLE_BLOCKS + 1)
            offsets = [0] + [_SAMPLE_EDGE + step * (i + 1) for i in range(_SAMPLE_BLOCKS)] + [size - _SAMPLE_EDGE]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(_SAMPLE_EDGE if offset in (0, size - _SAMPLE_EDGE) else _SAMPLE_BLOCK))
    return digest.hexdigest()[:16]


def _original_key(tensors: dict[str, torch.Tensor], name: str) -> str:
    for prefix in ("",) + _PREFIXES:
        if prefix + name in tensors:
            return prefix + name
    raise KeyError(name)


class SyntheticWeights:
    """Seeded synthetic weights of any model shape (any family's spec), made at memory speed: the benchmarks' model.

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

    def __init__(self, spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
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


def synthetic_spec(model: str) -> ModelSpec | None:
    """The spec of a published size of any family (``opt-1.3b``, ``facebook/opt-1.3b``,
    ``llama-3.1-8b``), or None when no family publishes that name."""
    name = str(model).lower().rsplit("/", 1)[-1]
    for family in families().values():
        if name in family.sizes():
            return family.sizes()[name]
    return None


def size_names() -> list[str]:
    """Every family's published size names, for the message that lists them."""
    return [name for family in families().values() for name in family.sizes()]


def open_source(model: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> WeightSource:
    """An HF checkpoint directory, or synthetic weights for a size name of any family."""
    path = Path(model)
    if path.is_dir():
        return HFCheckpoint(path)
    spec = synthetic_spec(str(model))
    if spec is not None:
        return SyntheticWeights(spec, seed=seed, dtype=dtype)
    raise CheckpointError(
        f"{model}: neither a checkpoint directory nor a model size ({', '.join(size_names())})"
    )
