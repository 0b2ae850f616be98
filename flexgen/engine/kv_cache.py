"""The KV cache: one unit per (decoder layer, GPU batch), in its tier, read and written through the cache compressor.

Layout: each unit holds k and v as the compressor's parts, shaped (token, batch, head, ...):
a decode step appends one token as one contiguous slab per part, a prefix read is the
leading slice of each part, and a compressor groups along the last axis only (checked at
start), so the first three axes survive compression and any prefix of tokens can be read.
Attention gets (batch, head, token, dim) views of that layout, or the packed parts
themselves (:class:`~flexgen.attention.base.PackedKV`) for a backend that dequantises
block by block.

The cache is allocated once per engine and reused by every block that fits: allocating a
host-resident cache means zero-filling and page-locking it (43 GB in the W3 workload).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.compression.base import Compressor
from flexgen.compression.none import NoCompression
from flexgen.engine.sizes import itemsize, numel
from flexgen.engine.stats import EngineStats
from flexgen.engine.transfers import Transfers
from flexgen.errors import PluginError
from flexgen.models.family import ModelFamily, ModelSpec
from flexgen.policy import Policy, split_by_percent
from flexgen.storage.base import StorageBackend


@dataclass
class CacheUnit:
    """The KV cache of one (decoder layer, GPU batch): parts of k and v, shaped (T, B, H, ...)."""

    tier: str
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    keys: list[str]


class KVCache:
    """The engine's KV cache: allocation, growth, and every read and write of it."""

    def __init__(self, family: ModelFamily, spec: ModelSpec, policy: Policy, storage: Mapping[str, StorageBackend],
                 compressor: Compressor, attention: AttentionBackend, attention_device: torch.device,
                 tier_location, dtype: torch.dtype, transfers: Transfers, stats: EngineStats, run_id: str) -> None:
        self.spec = spec
        #: Per decoder layer: KV heads, head size, sliding window. Every unit has the shape of
        #: layer 0's (families differ in windows per layer, not in KV heads).
        self.geometry = [family.cache_geometry(spec, layer) for layer in range(spec.num_layers)]
        self.policy = policy
        self.storage = storage
        self.compressor = compressor
        self.attention = attention
        self.attention_device = attention_device
        self.tier_location = tier_location  # tier -> the device its tensors are used from without a copy
        self.dtype = dtype
        self.transfers = transfers
        self.stats = stats
        self.run_id = run_id
        self.units: list[list[CacheUnit]] | None = None  # [decoder layer][GPU batch]
        self.length = 0  # positions each unit holds
        self._check_compressor()

    def _check_compressor(self) -> None:
        shape = (3, 2, self.geometry[0].num_kv_heads, self.geometry[0].head_dim)
        for name, (part_shape, _) in self.compressor.part_specs(shape, self.dtype).items():
            if tuple(part_shape[:3]) != shape[:3]:
                raise PluginError(
                    f"plugins.cache_compressor: part {name!r} does not keep the (token, batch, head) axes; "
                    "a cache compressor must group along the last axis"
                )

    def _shape(self, length: int) -> tuple[int, int, int, int]:
        """(token, batch, KV head, dim): KV heads, not query heads, so a grouped-query model's
        cache is ``num_heads / num_kv_heads`` times smaller than its queries would suggest."""
        geometry = self.geometry[0]
        return (length, self.policy.gpu_batch_size, geometry.num_kv_heads, geometry.head_dim)

    def window_start(self, layer: int, length: int) -> int:
        """The first position a query after ``length`` cached positions (its own included) attends to:
        0, or the start of decoder layer ``layer``'s sliding window, so a windowed decode reads
        no more of the cache than the window."""
        window = self.geometry[layer].window
        return 0 if window is None else max(0, length - window)

    # ------------------------------------------------------------------ allocation

    def for_length(self, length: int) -> list[list[CacheUnit]]:
        """The units for a block of ``length`` positions, reused from block to block.

        A block longer than every block before it makes the cache anew. Positions a block has
        not written are never read: the prefill writes the prompt's and each decode step writes
        its token before attending.
        """
        if self.units is None or self.length < length:
            self.free()
            self.units = self._allocate(length)
            self.length = length
        L, K = self.spec.num_layers, self.policy.num_gpu_batches
        shape = self._shape(length)
        self.stats.compression["cache_stored_bytes"] += 2 * L * K * self.compressor.nbytes(shape, self.dtype)
        self.stats.compression["cache_raw_bytes"] += 2 * L * K * numel(shape) * itemsize(self.dtype)
        return self.units

    def _allocate(self, length: int) -> list[list[CacheUnit]]:
        """One unit per (decoder layer, GPU batch), spread over the tiers by the policy's cache percentages."""
        L, K = self.spec.num_layers, self.policy.num_gpu_batches
        specs = self.compressor.part_specs(self._shape(length), self.dtype)
        tiers = split_by_percent([1] * (L * K), self.policy.percents("cache"))
        units = []
        for layer in range(L):
            row = []
            for batch in range(K):
                tier = tiers[layer * K + batch]
                keys, kv = [], {}
                for which in ("k", "v"):
                    kv[which] = {}
                    for name, (part_shape, part_dtype) in specs.items():
                        key = f"cache/{self.run_id}/{layer}/{batch}/{which}.{name}"
                        kv[which][name] = self.storage[tier].empty(key, part_shape, part_dtype)
                        keys.append(key)
                row.append(CacheUnit(tier, kv["k"], kv["v"], keys))
            units.append(row)
        return units

    def free(self) -> None:
        """Free every unit (the caller has made sure no copy still reads or writes them)."""
        if self.units is None:
            return
        for row in self.units:
            for unit in row:
                for key in unit.keys:
                    self.storage[unit.tier].free(key)
        self.units = None

    # ------------------------------------------------------------------ reads and writes

    def resident_where_attended(self, unit: CacheUnit) -> bool:
        """Whether attention reads ``unit`` where it lives, with no copy of its prefix."""
        return self.tier_location(unit.tier) == self.attention_device

    def reads_packed(self) -> bool:
        """Whether attention takes a compressed cache as it is (PackedKV) and dequantises it block
        by block, rather than the engine decompressing the whole prefix every step."""
        return self.attention.reads_packed_cache and not isinstance(self.compressor, NoCompression)

    def read(self, unit: CacheUnit, length: int, dest: torch.device, start: int = 0):
        """Keys and values of positions [start, length) on ``dest``: as (B, H_kv, t, D) tensors (views
        where they already are), or, for an attention backend that reads packed caches, as PackedKV."""
        shape = self._shape(length - start)
        out = []
        for parts in (unit.k, unit.v):
            moved = {name: self.transfers.fetch(unit.tier, t[start:length], dest) for name, t in parts.items()}
            if self.reads_packed():
                out.append(PackedKV(moved, self.compressor, shape, self.dtype))
            else:
                out.append(self.compressor.decompress(moved, shape, self.dtype).permute(1, 2, 0, 3))
        return out[0], out[1]

    def write(self, unit: CacheUnit, start: int, k: torch.Tensor, v: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Compress and write new keys/values (B, H, n, D) at positions [start, start + n).

        Returns the packed parts of k and v, i.e. exactly what the cache now holds for them.
        """
        written = []
        for parts, new in ((unit.k, k), (unit.v, v)):
            packed = self.compressor.compress(new.permute(2, 0, 1, 3).contiguous())
            for name, value in packed.items():
                self.transfers.write(unit.tier, parts[name][start:start + value.shape[0]], value)
            written.append(packed)
        return written

    def append(self, prefix, written: list[dict[str, torch.Tensor]], length: int, dest: torch.device):
        """A prefetched prefix of ``length`` positions with the token just written appended, as a
        read of the cache would return it (through the compressor): packed parts joined, or
        decompressed and concatenated. (``length``: the positions the prefix holds, fewer than
        the cache's under a sliding window.)"""
        written = [{n: p.to(dest) for n, p in packed.items()} for packed in written]
        new_shape = self._shape(1)
        if self.reads_packed():  # still packed: join the parts, compressed bytes only
            return tuple(PackedKV({n: torch.cat([old.parts[n], new[n]]) for n in new}, self.compressor,
                                  self._shape(length + 1), self.dtype)
                         for old, new in zip(prefix, written))
        stored = [self.compressor.decompress(new, new_shape, self.dtype).permute(1, 2, 0, 3) for new in written]
        return torch.cat([prefix[0], stored[0]], dim=2), torch.cat([prefix[1], stored[1]], dim=2)
