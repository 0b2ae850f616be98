"""The offloading policy: batch geometry and where each kind of tensor lives.

FlexGen's policy (Sheng et al., 2023) places weights, the KV cache and activations over three
tiers by percentage. What is not on the GPU or CPU is on disk. The policy says nothing about
*how* a tier stores a tensor (that is a StorageBackend) or where attention runs (an
AttentionBackend); it is plain data, validated when built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flexgen.errors import PolicyError

TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True)
class Policy:
    """Batch geometry and placement percentages.

    A *block* is ``num_gpu_batches`` GPU batches of ``gpu_batch_size`` sequences each; the
    zig-zag schedule loads one layer's weights once per block and step.
    """

    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    weights_gpu: float = 100
    weights_cpu: float = 0
    cache_gpu: float = 100
    cache_cpu: float = 0
    act_gpu: float = 100
    act_cpu: float = 0
    overlap: bool = True
    pin_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"policy.{name} must be an integer >= 1, got {value!r}")
        for kind in ("weights", "cache", "act"):
            gpu, cpu = getattr(self, f"{kind}_gpu"), getattr(self, f"{kind}_cpu")
            for tier, value in (("gpu", gpu), ("cpu", cpu)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                    raise PolicyError(f"policy.{kind}_{tier} must be a percentage in 0..100, got {value!r}")
            if gpu + cpu > 100:
                raise PolicyError(
                    f"policy.{kind}_gpu + policy.{kind}_cpu must be at most 100, got {gpu} + {cpu} = {gpu + cpu}"
                )

    @property
    def block_size(self) -> int:
        """Sequences generated together: one block of the zig-zag schedule."""
        return self.gpu_batch_size * self.num_gpu_batches

    def percents(self, kind: str) -> dict[str, float]:
        """Placement of one tensor kind (``weights``, ``cache`` or ``act``) as {tier: percent}."""
        gpu, cpu = getattr(self, f"{kind}_gpu"), getattr(self, f"{kind}_cpu")
        return {"gpu": gpu, "cpu": cpu, "disk": 100 - gpu - cpu}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Policy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PolicyError(f"unknown policy key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**values)


def choose_tier(position: float, percents: dict[str, float]) -> str:
    """The tier holding the item whose midpoint sits at ``position`` percent of the whole.

    Items (tensors of a layer, caches of a block) are laid end to end and cut into tiers by
    cumulative percentage, gpu first, then cpu, then disk; an item goes wholly to the tier its
    midpoint falls into. This is FlexGen's rule, and it keeps every tensor in one piece.
    """
    edge = 0.0
    for tier in TIERS:
        edge += percents[tier]
        if position < edge:
            return tier
    # Only reached through rounding at the very end: the last tier that holds anything.
    return [tier for tier in TIERS if percents[tier] > 0][-1]


def split_by_percent(sizes: list[int], percents: dict[str, float]) -> list[str]:
    """Assign each item (by its size) to a tier with :func:`choose_tier`."""
    total = sum(sizes) or 1
    tiers, start = [], 0
    for size in sizes:
        tiers.append(choose_tier(100.0 * (start + size / 2) / total, percents))
        start += size
    return tiers
