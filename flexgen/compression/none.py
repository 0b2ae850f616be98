"""The identity compressor: one part, the tensor itself."""

from collections.abc import Mapping

import torch

from flexgen.compression.base import Compressor, PartSpecs


class NoCompression(Compressor):
    """Stores tensors as they are."""

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> PartSpecs:
        return {"data": (tuple(shape), dtype)}

    def compress(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"data": x}

    def decompress(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return parts["data"].to(dtype)

    def decompress_into(
        self, parts: Mapping[str, torch.Tensor], out: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return out.copy_(parts["data"])
