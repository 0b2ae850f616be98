"""Weight placement: every weight put in its tier once, and a layer's weights brought to compute.

At load, each weight is made (read from the checkpoint, or drawn for synthetic weights), cast,
compressed where the policy says, and handed to its tier's storage; disk-tier tensors are
converted once into the offload folder and reused by later runs. During generation,
:meth:`WeightPlacement.load_layer` brings one model layer's weights to the compute device, on
the weight I/O thread (:mod:`flexgen.engine.transfers`), and decompresses them there on CUDA;
on the CPU the compute thread unpacks them (:meth:`WeightPlacement.ready`).
Embedding tables away from compute memory are not loaded whole: the rows a step needs are
gathered where the table lives (:meth:`WeightPlacement.gather_rows`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
import torch

from flexgen.compression.base import Compressor, keeps_rows
from flexgen.compression.none import NoCompression
from flexgen.engine.sizes import itemsize, nbytes, numel, release_freed_memory, short_hash
from flexgen.engine.stats import EngineStats
from flexgen.engine.transfers import Transfers
from flexgen.linear import RowBlocks, linear, prefers_row_major
from flexgen.models.checkpoint import WeightSource
from flexgen.models.family import ModelFamily, ModelSpec, WeightSpec
from flexgen.policy import Policy, split_by_percent
from flexgen.storage.base import StorageBackend
from flexgen.threads import affinity_cores, single_threaded_ops

#: Vectors (biases, layer norms) are stored as they are, whatever the weight compressor.
IDENTITY = NoCompression()


@dataclass
class PlacedWeight:
    """One weight tensor at home in a tier, possibly compressed into parts."""

    spec: WeightSpec
    tier: str
    parts: dict[str, torch.Tensor]
    compressed: bool


@dataclass
class Unpack(RowBlocks):
    """A weight whose bytes the I/O thread brought in, to be unpacked by the compute thread:
    whole (:meth:`WeightPlacement.unpacked`), or a block of rows at a time by the product that
    uses it (:mod:`flexgen.linear`), when rows of its parts unpack to rows of the weight."""

    placed: PlacedWeight
    parts: dict[str, torch.Tensor]
    compressor: Compressor  # IDENTITY for a weight only converted to the compute dtype
    dtype: torch.dtype  # the model's: what the weight was before compression

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.placed.spec.shape)

    def rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        parts = {name: part[start:stop] for name, part in self.parts.items()}
        return self.compressor.decompress_into(parts, out, self.dtype)

    def held(self) -> torch.Tensor | None:
        """The weight in the model's dtype, when it is only converted, not compressed."""
        return None if self.placed.compressed else self.parts["data"]


class WeightPlacement:
    """Where each weight of the model lives, and how a layer of them reaches compute."""

    def __init__(self, family: ModelFamily, spec: ModelSpec, policy: Policy, storage: Mapping[str, StorageBackend],
                 compressor: Compressor, compressor_id: str, device: torch.device, dtype: torch.dtype,
                 compute_dtype: torch.dtype, transfers: Transfers, stats: EngineStats,
                 progress: Callable[[int, int, int], None] | None = None) -> None:
        """``progress(layers placed, layers, tensors converted)`` is called as each model layer's
        weights are placed (from the placing thread), so a caller can show how a long load goes."""
        self.family = family
        self.spec = spec
        self.policy = policy
        self.storage = storage
        self.compressor = compressor
        self.compressor_id = compressor_id  # what names the converted files' folder
        self.device = device
        self.dtype = dtype  # the model's: weights at rest in the cpu and disk tiers
        #: what the products run in (flexgen/dtypes.py): uncompressed gpu-tier weights are kept
        #: in it, and weights at rest are converted to it as each layer is used
        self.compute_dtype = compute_dtype
        self.transfers = transfers
        self.stats = stats
        self.cuda = device.type == "cuda"
        self.layers: list[list[PlacedWeight]] = []
        self.resident: dict[int, dict[str, torch.Tensor]] = {}  # layers needing no load at all
        #: embedding tables whose rows are gathered where they live (name -> placed table)
        self.gathered: dict[str, PlacedWeight] = {}
        self.unpack_buffers: dict[str, torch.Tensor] = {}  # see unpacked
        self.progress = progress
        self.converted_weights = 0  # tensors converted into a persistent tier (the disk's offload folder)

    def tier_location(self, tier: str) -> torch.device:
        """The device whose memory a tier's tensors can be used from without a copy."""
        return self.device if tier == "gpu" else torch.device("cpu")

    # ------------------------------------------------------------------ at load

    def place(self, source: WeightSource) -> None:
        """Put every weight in its tier, converting disk-tier tensors once.

        Each tensor is made (read from the checkpoint, or drawn for synthetic weights) on the
        device that uses or compresses it: the compute device for the gpu tier and for a
        compressed weight, the CPU otherwise; then it is cast, compressed and stored, on a few
        threads at once. A layer's tensors are queued before the layer before it is waited on,
        so no layer waits for the slowest tensor of the last, and at most two layers are in
        flight, which bounds the memory a conversion takes. The threads share the cores: each
        runs its torch operations on one OpenMP thread (:func:`flexgen.threads.single_threaded_ops`).
        """
        folder = f"weights/{source.fingerprint()}-{str(self.dtype).removeprefix('torch.')}-{short_hash(self.compressor_id)}"
        percents = self.policy.percents("weights")
        workers = min(8, max(2, affinity_cores()))
        in_flight: deque[list[Future]] = deque()
        with single_threaded_ops(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexgen-place") as pool:
            for index in range(self.spec.num_model_layers):
                specs = self.family.layer_weights(self.spec, index)
                tiers = split_by_percent([numel(w.shape) for w in specs], percents)
                in_flight.append([
                    pool.submit(self._place_one, source, weight, tier, f"{folder}/{weight.name}")
                    for weight, tier in zip(specs, tiers)
                ])
                if len(in_flight) == 2:
                    self._register_layer([f.result() for f in in_flight.popleft()])
            while in_flight:
                self._register_layer([f.result() for f in in_flight.popleft()])
        self.gathered = self._gathered_tables()

    def _register_layer(self, placed: list[PlacedWeight]) -> None:
        index = len(self.layers)
        self.layers.append(placed)
        release_freed_memory()
        if all(p.tier == "gpu" and not p.compressed for p in placed):
            self.resident[index] = {p.spec.local: p.parts["data"] for p in placed}
        if self.progress is not None:
            self.progress(len(self.layers), self.spec.num_model_layers, self.converted_weights)

    def _place_one(self, source: WeightSource, weight: WeightSpec, tier: str, key: str) -> PlacedWeight:
        backend = self.storage[tier]
        compressed = len(weight.shape) >= 2 and not isinstance(self.compressor, NoCompression)
        compressor = self.compressor if compressed else IDENTITY
        part_names = list(compressor.part_specs(weight.shape, self.dtype))
        parts: dict[str, torch.Tensor] = {}
        converted = False
        if backend.persistent:  # reuse what an earlier run converted
            for name in part_names:
                found = backend.get(f"{key}.{name}")
                if found is not None:
                    parts[name] = found
        if len(parts) != len(part_names):
            made_on = self.device if tier == "gpu" or compressed else torch.device("cpu")
            column_major = self._prefers_column_major(weight, tier, compressed)
            made = source.get(weight, device=made_on, column_major=column_major)
            # Kept for compute (gpu tier, uncompressed): in the compute dtype; at rest: the model's.
            at_rest = self.compute_dtype if tier == "gpu" and not compressed else self.dtype
            packed = compressor.compress(made.to(at_rest))
            for name in part_names:
                part = packed.pop(name)
                # A part that is a fresh tensor nothing else holds can be kept as it is; one
                # that is a view of a checkpoint's memory map is copied.
                owned = source.fresh or part.untyped_storage().data_ptr() != made.untyped_storage().data_ptr()
                parts[name] = (backend.adopt if owned else backend.put)(f"{key}.{name}", part)
            del made
            converted = backend.persistent
        with self.stats.lock:  # placement runs on several threads
            self.converted_weights += converted
            self.stats.compression["weights_raw_bytes"] += numel(weight.shape) * itemsize(self.dtype)
            self.stats.compression["weights_stored_bytes"] += sum(nbytes(p) for p in parts.values())
        return PlacedWeight(weight, tier, parts, compressed)

    def _prefers_column_major(self, weight: WeightSpec, tier: str, compressed: bool) -> bool:
        """Whether to keep a matrix column-major, for CPU matmuls with few rows (decode).

        BLAS with a handful of rows reads an (out, in)-contiguous weight several times slower
        than an (in, out)-contiguous one; a decode step of OPT-125M is ~25 % faster. Matrices
        whose few-row products go to oneDNN instead (:mod:`flexgen.linear`) read fastest
        row-major and stay so. Only compute-resident, uncompressed matrices that go through
        a linear product qualify: embeddings are gathered by row.
        """
        return (self.device.type == "cpu" and tier == "gpu" and not compressed
                and len(weight.shape) == 2 and weight.local not in self.family.embedding_tables
                and not prefers_row_major(weight.shape, self.compute_dtype, self.device))

    def _gathered_tables(self) -> dict[str, PlacedWeight]:
        """The embedding tables not already usable in compute memory, whose rows can be gathered at home.

        A step embeds a few tokens per sequence, so it needs a few rows of each table: bringing
        a whole 50k-row table over PCIe every step would waste it. A compressed table qualifies
        when its compressor keeps the row axis in every part (it groups along the rows' own
        axis), so rows of the parts decompress to rows of the table.
        """
        gathered = {}
        for placed in self.layers[0] if self.layers else []:
            if placed.spec.local not in self.family.embedding_tables or (placed.tier == "gpu" and not placed.compressed):
                continue
            if placed.compressed and not keeps_rows(self.compressor, placed.spec.shape, self.dtype):
                continue
            gathered[placed.spec.local] = placed
        return gathered

    # ------------------------------------------------------------------ during generation

    def submit_layer(self, index: int) -> Future:
        """Start bringing model layer ``index``'s weights to compute (a future of (weights, event))."""
        if index in self.resident:
            future: Future = Future()
            future.set_result((self.resident[index], None))
            return future
        return self.transfers.load_weights(self.load_layer, index)

    def load_layer(self, index: int) -> dict[str, Any]:
        """The weights of a model layer on the compute device, decompressed.

        On the CPU this runs on the weight I/O thread and only brings the bytes in: weights
        to decompress, or to convert to the compute dtype, are left as :class:`Unpack` for the
        compute thread (:meth:`ready`), whose OpenMP team has the cores. A second team started
        from the I/O thread would compete with it for the same cores.
        """
        weights: dict[str, Any] = {}
        for placed in self.layers[index]:
            if index == 0 and placed.spec.local in self.gathered:
                continue  # its rows are gathered at home when the tokens are known
            parts = {name: self.transfers.fetch(placed.tier, t, self.device) for name, t in placed.parts.items()}
            if self.cuda:
                weights[placed.spec.local] = self.unpacked(placed, parts) if placed.compressed else parts["data"]
            elif placed.compressed or parts["data"].dtype != self.compute_dtype:
                compressor = self.compressor if placed.compressed else IDENTITY
                weights[placed.spec.local] = Unpack(placed, parts, compressor, self.dtype)
            else:
                weights[placed.spec.local] = parts["data"]
        return weights

    def release_layer(self, index: int) -> None:
        """Tell the tiers that model layer ``index``'s weights are done with until its next load.

        Runs on the weight I/O thread after the loads queued before it. The disk tier then gives
        back the page cache of layers it does not keep (:meth:`flexgen.storage.disk.DiskStorage.release`),
        so a model larger than memory does not thrash it.
        """
        if index in self.resident:
            return
        parts = [(placed.tier, part) for placed in self.layers[index] for part in placed.parts.values()]
        self.transfers.after_weight_loads(lambda: [self.storage[tier].release(part) for tier, part in parts])

    def ready(self, weights: dict[str, Any]) -> dict[str, Any]:
        """A loaded layer's weights with what the I/O thread left packed unpacked, on the compute
        thread; once per layer (the dict is shared by the layer's GPU batches). Matrices that
        their products can unpack a block of rows at a time stay packed (:meth:`_left_packed`)."""
        for name, value in weights.items():
            if isinstance(value, Unpack) and not self._left_packed(name, value.placed):
                weights[name] = self.unpacked(value.placed, value.parts)
        return weights

    def _left_packed(self, name: str, placed: PlacedWeight) -> bool:
        """Whether a packed weight is left for :func:`flexgen.linear.linear` to unpack by blocks of rows.

        Unpacked whole, a matrix is written out in float32 and read back by its product: on
        the CPU, with a decode step's few rows, that traffic is most of the product's time.
        The output embedding always qualifies (:meth:`logits` multiplies it; unpacked whole it
        would also take more memory than all other buffers together); the other matrices when
        the family's math passes them only to :func:`flexgen.linear.linear`
        (``ModelFamily.accepts_row_blocks``), unless they are compressed and several GPU
        batches use them, which would decompress them once per batch. Either way only where
        rows of the parts unpack to rows of the weight.
        """
        if len(placed.spec.shape) != 2 or not self._rows_unpackable(placed):
            return False
        if name == "lm_head.weight":
            return True
        return (self.family.accepts_row_blocks and name not in self.family.embedding_tables
                and not (placed.compressed and self.policy.num_gpu_batches > 1))

    def _rows_unpackable(self, placed: PlacedWeight) -> bool:
        return not placed.compressed or keeps_rows(self.compressor, placed.spec.shape, self.dtype)

    def logits(self, weights: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the head; a packed output embedding is unpacked a block of rows at a time.

        The output embedding is the largest weight (50,272 rows; 1.4 GB in float32 at OPT-30B's
        width): unpacked whole, it alone would take more memory than every other layer's
        buffers together.
        """
        packed = weights.get("lm_head.weight")
        if not isinstance(packed, Unpack):
            return self.family.head(self.spec, weights, x)
        features = self.family.head_features(self.spec, weights, x)  # (B, e)
        if features is None:  # the family's head is more than one product: unpack it whole
            return self.family.head(self.spec, {**weights, "lm_head.weight": self.unpacked(packed.placed, packed.parts)}, x)
        return linear(features, packed)

    def _unpack_buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = self.unpack_buffers.get(name)
        if buffer is None or tuple(buffer.shape) != tuple(shape):
            buffer = self.unpack_buffers[name] = torch.empty(shape, dtype=self.compute_dtype)
        return buffer

    def unpacked(self, placed: PlacedWeight, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """A compressed weight decompressed on the compute device.

        On the CPU it is unpacked in one pass into a buffer kept per weight name: a fresh
        tensor per load would be returned to the OS and faulted in again every layer, two to
        three times the cost of the unpacking. One buffer per name is enough: the compute
        thread unpacks a layer when it first uses it (:meth:`ready`), and by then every task
        of the layer of the same kind before it is finished (a pending host attention of that
        layer is finished by the next layer, of the other kind). On CUDA the caching allocator
        already reuses memory, and the fused kernel writes a fresh tensor.
        """
        compressor = self.compressor if placed.compressed else IDENTITY  # or a dtype conversion
        if self.cuda:
            return compressor.decompress(parts, placed.spec.shape, self.dtype)
        return compressor.decompress_into(parts, self._unpack_buffer(placed.spec.local, placed.spec.shape), self.dtype)

    def gather_rows(self, placed: PlacedWeight, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (B, n) of an embedding table, gathered where it lives, on the compute device."""
        flat = index.reshape(-1)
        home = self.tier_location(placed.tier)
        parts = {name: self.transfers.fetch(placed.tier, t.index_select(0, flat.to(home)), self.device)
                 for name, t in placed.parts.items()}
        shape = (flat.numel(), placed.spec.shape[1])
        rows = self.compressor.decompress(parts, shape, self.dtype) if placed.compressed else parts["data"]
        return rows.to(self.compute_dtype).reshape(*index.shape, shape[1])

    def close(self) -> None:
        self.layers.clear()
        self.resident.clear()
        self.unpack_buffers.clear()
