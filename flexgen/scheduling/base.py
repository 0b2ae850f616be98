"""Scheduler: the order in which one generation step visits (layer, GPU batch) pairs.

The engine runs one step (the prefill, or one new token) of a block as a sequence of tasks and
prefetches the inputs of the next task (weights, cache, activations) while the current one
computes. The order decides how often weights are loaded: visiting every batch of a layer
before the next layer (zig-zag) loads each layer once per step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    """Compute model layer ``layer`` for GPU batch ``batch``."""

    layer: int
    batch: int


class Scheduler(ABC):
    """Orders the tasks of one step."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown options {sorted(options)}")

    @abstractmethod
    def order(self, num_layers: int, num_batches: int) -> list[Task]:
        """Every (layer, batch) exactly once; each batch visits its layers in increasing order."""
