"""StorageBackend: one memory tier (gpu, cpu or disk) that holds named tensors.

The engine stores weights, KV caches and activations in tiers chosen by the policy, and moves
them to the compute device through the backend that holds them. A backend knows how to keep a
tensor and how to move it; it knows nothing of layers, batches or the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch


class StorageBackend(ABC):
    """A place where tensors live between uses.

    Keys are slash-separated names chosen by the engine (``"weights/<id>/layers.0.fc1.weight"``,
    ``"cache/<run>/3/1/k.data"``); they are unique within one backend instance.
    """

    #: True when tensors survive the process (the disk tier), so converted weights are reused.
    persistent: ClassVar[bool] = False

    def __init__(
        self,
        compute_device: torch.device | str = "cpu",
        offload_dir: str | Path | None = None,
        pin_memory: bool = True,
        **options: Any,
    ) -> None:
        self.compute_device = torch.device(compute_device)
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.pin_memory = pin_memory
        if options:
            raise TypeError(f"unknown options {sorted(options)}")

    @abstractmethod
    def put(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep a copy of ``tensor`` under ``key``; return the resident tensor.

        Putting a key again replaces its value, possibly in the same memory: a tensor returned
        by an earlier ``put`` of that key must not be relied on afterwards.
        """

    def adopt(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor`` itself under ``key`` where this tier can; return the resident tensor.

        The caller gives ``tensor`` up: the engine hands over the tensors it made while placing
        a model, so a tier that can hold them as they are saves a copy of the whole model. The
        default keeps a copy, exactly as :meth:`put`.
        """
        return self.put(key, tensor)

    @abstractmethod
    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate a zero-filled resident tensor under ``key``, to be written in place."""

    @abstractmethod
    def get(self, key: str) -> torch.Tensor | None:
        """The resident tensor stored under ``key`` (by a past process too, if persistent), or None."""

    @abstractmethod
    def free(self, key: str) -> None:
        """Forget ``key`` and release its memory (persistent files are kept)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this tier holds now."""

    def fetch(self, resident: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        """``resident`` (or a slice of it) on ``device`` for compute; a view when already there."""
        return resident.to(device, non_blocking=non_blocking)

    def release(self, resident: torch.Tensor) -> None:
        """A hint: the engine is done with a tensor it fetched until it fetches it again.

        Called (on the weight I/O thread) for each part of a model layer's weights once that
        layer is computed. A tier may give back memory it holds on the tensor's behalf; the
        tensor stays valid and must read the same when fetched again. The disk tier uses it
        to keep the page cache from thrashing when the model is larger than memory. Default:
        nothing.
        """

    def write(self, resident: torch.Tensor, value: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy ``value`` into ``resident`` (or a slice of it) in place."""
        resident.copy_(value, non_blocking=non_blocking)

    def close(self) -> None:
        """Release everything that is not persistent."""
