"""Compressor: how a tensor is packed while at rest and in transit.

A compressed tensor is a dict of named parts (e.g. packed integers, scales, offsets), each an
ordinary tensor that any StorageBackend can hold and move. Decompression happens on the
compute device, just before use.

Cache compressors receive slices of shape (n, B, H, D) and must return parts whose leading
three axes are (n, B, H), so the engine can write each new token's parts in place into a
preallocated cache (grouping along the last axis does this).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from math import prod
from typing import Any

import torch

PartSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Compressor(ABC):
    """Packs tensors into named parts and unpacks them."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown options {sorted(options)}")

    @abstractmethod
    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        """Shape and dtype of every part of a compressed tensor of ``shape`` and ``dtype``."""

    @abstractmethod
    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pack ``x`` into parts on ``x``'s device, shaped as :meth:`part_specs` says."""

    @abstractmethod
    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Unpack parts into a tensor of ``shape`` and ``dtype`` on the parts' device."""

    def decompress_into(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Unpack parts into the preallocated ``out`` and return it.

        ``out`` has the compressed tensor's shape, on the parts' device, in any floating dtype
        (a block of a float32 workspace, say); ``dtype`` is the dtype the tensor was compressed
        from, what :meth:`decompress` would return (``out.dtype`` when None). The default
        decompresses and copies; compressors override it to write ``out`` directly, which
        lets a caller reuse one buffer instead of receiving a fresh tensor every call.
        """
        unpacked = self.decompress(parts, tuple(out.shape), out.dtype if dtype is None else dtype)
        return out.copy_(unpacked)

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes a compressed tensor of ``shape`` occupies."""
        return sum(prod(s) * torch.empty((), dtype=d).element_size() for s, d in self.part_specs(shape, dtype).values())


def keeps_rows(compressor: Compressor, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether every part of ``compressor``'s output for tensors like ``shape`` keeps their first axis.

    Then rows ``i`` of the parts are the parts of row ``i`` of the tensor, so a few rows of a
    compressed embedding table can be gathered and decompressed alone. Checked on two row
    counts, so a part whose first axis merely happens to equal one is not taken for one that
    keeps rows (a compressor grouping along the first axis does not).
    """
    cols = tuple(shape[1:])
    return all(
        part_shape[0] == rows
        for rows in (3, 5)
        for part_shape, _ in compressor.part_specs((rows, *cols), dtype).values()
    )
