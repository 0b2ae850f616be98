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
import zlib
from pathlib import Path
from typing import Protocol

import torch

from flexgen.errors import CheckpointError
from flexgen.models.opt import OPT_SIZES, OPTSpec, WeightSpec, spec_for_size
from flexgen.storage.disk import map_safetensors

_PREFIXES = ("model.decoder.", "decoder.", "model.")


class WeightSource(Protocol):
    """Hands out one weight tensor at a time, on the CPU."""

    spec: OPTSpec

    def fingerprint(self) -> str:
        """Changes whenever any tensor would change; names converted copies on disk."""

    def get(self, weight: WeightSpec) -> torch.Tensor:
        """The tensor for ``weight``, in any dtype (the caller casts)."""


def _normalise(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class HFCheckpoint:
    """A local HF transformers checkpoint directory of an OPT model."""

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

    def get(self, weight: WeightSpec) -> torch.Tensor:
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
        return tensor


def _original_key(tensors: dict[str, torch.Tensor], name: str) -> str:
    for prefix in ("",) + _PREFIXES:
        if prefix + name in tensors:
            return prefix + name
    raise KeyError(name)


class SyntheticWeights:
    """Seeded random weights of any OPT shape: the benchmarks' model, no download.

    Matrices and embeddings are N(0, 0.02²) like OPT's initialisation, biases zero, layer-norm
    gains one. Each tensor has its own generator seeded from (seed, name).
    """

    def __init__(self, spec: OPTSpec, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
        self.spec = spec
        self.seed = seed
        self.dtype = dtype

    def fingerprint(self) -> str:
        text = json.dumps([self.spec.to_dict(), self.seed, str(self.dtype)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def get(self, weight: WeightSpec) -> torch.Tensor:
        if weight.init == "zeros":
            return torch.zeros(weight.shape, dtype=self.dtype)
        if weight.init == "ones":
            return torch.ones(weight.shape, dtype=self.dtype)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{weight.name}".encode()))
        return torch.empty(weight.shape, dtype=self.dtype).normal_(0.0, 0.02, generator=generator)


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
