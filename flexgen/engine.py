"""The engine: runs the zig-zag block schedule over weights, caches and activations in tiers.

One ``generate`` call cuts the prompts into *blocks* of ``num_gpu_batches × gpu_batch_size``
sequences. For each block, each step (the prefill, then one token at a time) is a list of
tasks (model layer j, GPU batch k) in the order the Scheduler gives. Moving data overlaps
computing it: the next layer's weights start loading when the current layer starts (once per
layer and step under zig-zag), and while task t computes, a second I/O thread fetches what
task t+1 needs besides weights: the cache prefix of its (layer, batch) when attention runs
away from the cache's home, and its hidden states when they live in another tier. On CUDA
each kind of copy has its own stream (weights, cache loads, stores to host tiers), and
compute waits on events, never on the whole device; the host waits only for the layer before
the current one before asking for the next layer's weights, which bounds the weights in
compute memory to three layers. Decode attention on the host (CPU delegation over a host
cache) runs on its own worker thread, and a batch's output projection is issued when the
batch is next used, so the GPU computes the other batches meanwhile.

The engine talks to storage, compression, attention and the model only through their
interfaces; it knows which tier holds what, and when to move it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flexgen import registry
from flexgen.attention.base import PackedKV
from flexgen.compression.base import keeps_rows
from flexgen.compression.none import NoCompression
from flexgen.dtypes import DTYPE_CHOICES, compute_dtype, resolve_dtype
from flexgen.errors import FlexGenError, PluginError, PolicyError, PromptError
from flexgen.models import opt
from flexgen.models.checkpoint import WeightSource, open_source
from flexgen.paths import cache_root
from flexgen.policy import TIERS, Policy, split_by_percent
from flexgen.scheduling.base import Task
from flexgen.threads import ThreadGovernor, affinity_cores, parse_threads, single_threaded_ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DEFAULT_PLUGINS: dict[str, Any] = {
    "storage": {"gpu": "gpu", "cpu": "cpu", "disk": "disk"},
    "attention": "gpu",
    "weight_compressor": "none",
    "cache_compressor": "none",
    "scheduler": "zigzag",
}

#: Vectors (biases, layer norms) are stored as they are, whatever the weight compressor.
_IDENTITY = NoCompression()

#: Bytes of output embedding unpacked at a time on the CPU (see Engine._logits).
_HEAD_SLICE_BYTES = 32 << 20

LINKS = ("disk->cpu", "cpu->gpu", "gpu->cpu", "cpu->disk")


def default_offload_dir() -> Path:
    """Where disk-tier tensors live unless the user says otherwise."""
    return cache_root() / "offload"


@dataclass
class EngineStats:
    """What the engine did: time per phase, tokens, bytes per link, peak bytes per tier."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    bytes_moved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINKS, 0))
    peak_memory: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    compression: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("weights_raw_bytes", "weights_stored_bytes", "cache_raw_bytes", "cache_stored_bytes"), 0
        )
    )
    #: the intra-op thread setting of the last step (:meth:`flexgen.threads.ThreadChoice.to_dict`)
    threads: dict[str, Any] | None = None
    #: the model's dtype and the one its products run in (they differ for half precision on a
    #: CPU without native instructions for it; see flexgen/dtypes.py)
    dtype: str | None = None
    compute_dtype: str | None = None

    @property
    def total_time_s(self) -> float:
        return self.prefill_time_s + self.decode_time_s

    def _rate(self, tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the metrics JSON. Throughput is FlexGen's: new tokens / (prefill + decode)."""
        return {
            "prefill_time_s": self.prefill_time_s,
            "decode_time_s": self.decode_time_s,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_throughput": self._rate(self.prompt_tokens, self.prefill_time_s),
            "decode_throughput": self._rate(self.generated_tokens, self.decode_time_s),
            "total_throughput": self._rate(self.generated_tokens, self.total_time_s),
            "bytes_moved": dict(self.bytes_moved),
            "peak_memory": dict(self.peak_memory),
            "compression": dict(self.compression),
            "threads": dict(self.threads) if self.threads else None,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
        }

    def reset(self) -> None:
        """Zero the counters of time, tokens and traffic (placement figures stay)."""
        self.prefill_time_s = self.decode_time_s = 0.0
        self.prompt_tokens = self.generated_tokens = 0
        self.bytes_moved = dict.fromkeys(LINKS, 0)


@dataclass
class PlacedWeight:
    """One weight tensor at home in a tier, possibly compressed into parts."""

    spec: opt.WeightSpec
    tier: str
    parts: dict[str, torch.Tensor]
    compressed: bool


@dataclass
class _Unpack:
    """A weight whose bytes the I/O thread brought in, to be unpacked by the compute thread."""

    placed: PlacedWeight
    parts: dict[str, torch.Tensor]


@dataclass
class CacheUnit:
    """The KV cache of one (decoder layer, GPU batch): parts of k and v, shaped (T, B, H, ...)."""

    tier: str
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    keys: list[str]


@dataclass
class HostAttention:
    """A decode attention running on the host worker for one GPU batch.

    It is finished (the output projection issued on the compute device) when the batch is
    next used, so the GPU meanwhile computes the other batches' work.
    """

    future: Future  # -> the attention output (B, H, 1, D) on the host
    x: torch.Tensor  # the attention layer's input: the residual
    weights: dict[str, torch.Tensor]  # the attention layer's weights, for the output projection


@dataclass
class GPUBatch:
    """The state of one GPU batch of a block between tasks."""

    prompt_ids: torch.Tensor  # (B, n) left-padded, on the compute device
    valid: torch.Tensor  # (B, T) bool: real tokens so far and to come
    valid_host: torch.Tensor  # the same, on the host (CPU attention reads it with no device wait)
    prompt_ids_host: torch.Tensor  # prompt_ids on the host (embedding rows gathered there)
    padded: bool  # some sequence is shorter than the block's prompt: attention needs a mask
    next_ids: torch.Tensor | None = None  # (B, 1) the tokens to embed in this step
    hidden: torch.Tensor | None = None  # resident in the batch's activation tier
    pending: HostAttention | None = None  # hidden states still being computed on the host
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Block:
    """One block being generated: its GPU batches and where their tensors live."""

    batches: list[GPUBatch]
    prompt_len: int
    act_tiers: list[str]  # home tier of each GPU batch's hidden states
    cache: list[list[CacheUnit]]  # [decoder layer][GPU batch]
    sampling: "_Sampling"
    streams: list[bytes]  # each row's random stream (see _Sampling.pick)


def _executor(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


class _Inline:
    """An executor that runs work at once: the engine without overlap."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


class Engine:
    """Generates with an OPT model whose tensors are spread over tiers by a Policy."""

    def __init__(
        self,
        source: WeightSource,
        policy: Policy,
        plugins: Mapping[str, Any],
        device: torch.device,
        offload_dir: Path,
        dtype: torch.dtype,
        threads: int | None = None,
    ) -> None:
        self.spec = source.spec
        self.policy = policy
        self.device = device = resolve_device(device)
        self.dtype = dtype
        #: What the products run in: the model's dtype, except on a CPU without native
        #: instructions for it, where half precision is computed in float32 (flexgen/dtypes.py).
        #: Compute memory (gpu-tier weights, the KV cache, activations) holds this dtype; the cpu
        #: and disk tiers hold weights in the model's dtype, converted as each layer is used.
        self.compute_dtype = DTYPES[compute_dtype(str(dtype).removeprefix("torch."), device)]
        self.cache_dtype = self.compute_dtype
        self.offload_dir = offload_dir
        self.plugins = {**DEFAULT_PLUGINS, **{k: v for k, v in plugins.items() if v is not None}}
        unknown = sorted(set(self.plugins) - set(DEFAULT_PLUGINS))
        if unknown:
            raise PluginError(f"unknown plugins key {unknown[0]!r}; keys: {', '.join(DEFAULT_PLUGINS)}")
        self.stats = EngineStats(dtype=str(dtype).removeprefix("torch."),
                                 compute_dtype=str(self.compute_dtype).removeprefix("torch."))
        self._stats_lock = threading.Lock()  # the I/O thread counts bytes too

        storage_specs = {**DEFAULT_PLUGINS["storage"], **dict(self.plugins["storage"])}
        self.storage = {
            tier: registry.create(
                "storage", storage_specs[tier], where=f"plugins.storage.{tier}",
                compute_device=device, offload_dir=offload_dir, pin_memory=policy.pin_weights,
            )
            for tier in TIERS
        }
        self.attention = registry.create("attention", self.plugins["attention"], where="plugins.attention")
        self.weight_compressor = registry.create(
            "compressor", self.plugins["weight_compressor"], where="plugins.weight_compressor"
        )
        self.cache_compressor = registry.create(
            "compressor", self.plugins["cache_compressor"], where="plugins.cache_compressor"
        )
        self.scheduler = registry.create("scheduler", self.plugins["scheduler"], where="plugins.scheduler")
        self.attention_device = self.attention.device(device)
        self._check_cache_compressor()

        self._cuda = device.type == "cuda"
        # Weight loads and cache/activation loads each have an I/O thread and, on CUDA, a
        # stream of their own, so a layer's weights loading ahead never delay the next batch's
        # cache; copies back to host tiers run on a store stream. Compute waits on events,
        # never on the whole device.
        overlap_streams = self._cuda and policy.overlap
        self._weight_stream = torch.cuda.Stream(device) if overlap_streams else None
        self._cache_stream = torch.cuda.Stream(device) if overlap_streams else None
        self._store_stream = torch.cuda.Stream(device) if overlap_streams else None
        self._stores_done: torch.cuda.Event | None = None  # the last store issued
        self._weight_io = _executor("flexgen-weights") if policy.overlap else _Inline()
        self._cache_io = _executor("flexgen-cache") if policy.overlap else _Inline()
        #: Decode attention on the host runs on its own worker thread, so the main thread goes
        #: on issuing the other GPU batches' work while it runs (CPU delegation beside GPU
        #: work). On by default where that pays: a GPU computes and attention runs on the host.
        #: Tests turn it on to run this path on a machine without CUDA.
        self.host_attention_on_worker = self._cuda and policy.overlap and self.attention_device.type == "cpu"
        self._attention_io = _executor("flexgen-attention")
        self._run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._cache: list[list[CacheUnit]] | None = None  # reused by every block that fits
        self._unpack_buffers: dict[str, torch.Tensor] = {}  # see _unpacked
        self._cache_length = 0

        #: Intra-op threads (flexgen/threads.py): on the CPU decided from the cores, their load
        #: and the work (the largest product of a decode step: the first MLP matrix); on CUDA
        #: only an explicit setting is applied, torch's own is kept otherwise.
        work = 2 * policy.gpu_batch_size * self.spec.hidden_size * self.spec.ffn_dim
        self._threads = ThreadGovernor(threads, work if not self._cuda else None) \
            if not self._cuda or threads is not None else None

        self.layers: list[list[PlacedWeight]] = []
        self._resident: dict[int, dict[str, torch.Tensor]] = {}  # layers needing no load at all
        self._place_weights(source)
        #: embedding tables whose rows are gathered where they live (name -> placed table)
        self._gathered = self._gathered_tables()

    # ------------------------------------------------------------------ placement

    def _check_cache_compressor(self) -> None:
        shape = (3, 2, self.spec.num_heads, self.spec.head_dim)
        for name, (part_shape, _) in self.cache_compressor.part_specs(shape, self.cache_dtype).items():
            if tuple(part_shape[:3]) != shape[:3]:
                raise PluginError(
                    f"plugins.cache_compressor: part {name!r} does not keep the (token, batch, head) axes; "
                    "a cache compressor must group along the last axis"
                )

    def _tier_location(self, tier: str) -> torch.device:
        """The device whose memory a tier's tensors can be used from without a copy."""
        return self.device if tier == "gpu" else torch.device("cpu")

    def _place_weights(self, source: WeightSource) -> None:
        """Put every weight in its tier, converting disk-tier tensors once.

        Each tensor is made (read from the checkpoint, or drawn for synthetic weights) on the
        device that uses or compresses it: the compute device for the gpu tier and for a
        compressed weight, the CPU otherwise; then it is cast, compressed and stored, on a few
        threads at once. A layer's tensors are queued before the layer before it is waited on,
        so no layer waits for the slowest tensor of the last, and at most two layers are in
        flight, which bounds the memory a conversion takes. The threads share the cores: each
        runs its torch operations on one OpenMP thread (:func:`flexgen.threads.single_threaded_ops`).
        """
        compressor_id = repr(registry.parse_spec(self.plugins["weight_compressor"], "plugins.weight_compressor"))
        folder = f"weights/{source.fingerprint()}-{str(self.dtype).removeprefix('torch.')}-{_short_hash(compressor_id)}"
        percents = self.policy.percents("weights")
        workers = min(8, max(2, affinity_cores()))
        in_flight: deque[list[Future]] = deque()
        with single_threaded_ops(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexgen-place") as pool:
            for index in range(self.spec.num_model_layers):
                specs = opt.layer_weights(self.spec, index)
                tiers = split_by_percent([_numel(w.shape) for w in specs], percents)
                in_flight.append([
                    pool.submit(self._place_one, source, weight, tier, f"{folder}/{weight.name}")
                    for weight, tier in zip(specs, tiers)
                ])
                if len(in_flight) == 2:
                    self._register_layer([f.result() for f in in_flight.popleft()])
            while in_flight:
                self._register_layer([f.result() for f in in_flight.popleft()])
        self._note_memory()

    def _register_layer(self, placed: list[PlacedWeight]) -> None:
        index = len(self.layers)
        self.layers.append(placed)
        _release_freed_memory()
        if all(p.tier == "gpu" and not p.compressed for p in placed):
            self._resident[index] = {p.spec.local: p.parts["data"] for p in placed}

    def _place_one(self, source: WeightSource, weight: opt.WeightSpec, tier: str, key: str) -> PlacedWeight:
        backend = self.storage[tier]
        compressed = len(weight.shape) >= 2 and not isinstance(self.weight_compressor, NoCompression)
        compressor = self.weight_compressor if compressed else _IDENTITY
        part_names = list(compressor.part_specs(weight.shape, self.dtype))
        parts: dict[str, torch.Tensor] = {}
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
        with self._stats_lock:  # placement runs on several threads
            self.stats.compression["weights_raw_bytes"] += _numel(weight.shape) * _itemsize(self.dtype)
            self.stats.compression["weights_stored_bytes"] += sum(_nbytes(p) for p in parts.values())
        return PlacedWeight(weight, tier, parts, compressed)

    def _prefers_column_major(self, weight: opt.WeightSpec, tier: str, compressed: bool) -> bool:
        """Whether to keep a matrix column-major, for CPU matmuls with few rows (decode).

        CPU GEMM with a handful of rows reads an (out, in)-contiguous weight several times
        slower than an (in, out)-contiguous one; a decode step of OPT-125M is ~25 % faster.
        Only compute-resident, uncompressed matrices that go through ``F.linear`` qualify:
        embeddings are gathered by row.
        """
        return (self.device.type == "cpu" and tier == "gpu" and not compressed
                and len(weight.shape) == 2 and not weight.local.startswith("embed_"))

    def _gathered_tables(self) -> dict[str, PlacedWeight]:
        """The embedding tables not already usable in compute memory, whose rows can be gathered at home.

        A step embeds a few tokens per sequence, so it needs a few rows of each table: bringing
        a whole 50k-row table over PCIe every step would waste it. A compressed table qualifies
        when its compressor keeps the row axis in every part (it groups along the rows' own
        axis), so rows of the parts decompress to rows of the table.
        """
        gathered = {}
        for placed in self.layers[0] if self.layers else []:
            if placed.spec.local not in opt.EMBEDDING_TABLES or (placed.tier == "gpu" and not placed.compressed):
                continue
            if placed.compressed and not keeps_rows(self.weight_compressor, placed.spec.shape, self.dtype):
                continue
            gathered[placed.spec.local] = placed
        return gathered

    def _note_memory(self) -> None:
        for tier, backend in self.storage.items():
            self.stats.peak_memory[tier] = max(self.stats.peak_memory[tier], backend.nbytes())
        if self._cuda:
            self.stats.peak_memory["gpu"] = max(
                self.stats.peak_memory["gpu"], torch.cuda.max_memory_allocated(self.device)
            )

    # ------------------------------------------------------------------ movement

    def _count(self, link: str, nbytes: int) -> None:
        with self._stats_lock:
            self.stats.bytes_moved[link] += nbytes

    def _count_read(self, tier: str, dest: torch.device, nbytes: int) -> None:
        """Account the links a copy from ``tier`` to ``dest`` crosses."""
        if tier == "disk":
            self._count("disk->cpu", nbytes)
        if dest.type == "cuda" and tier != "gpu":
            self._count("cpu->gpu", nbytes)
        if dest.type == "cpu" and tier == "gpu" and self._cuda:
            self._count("gpu->cpu", nbytes)

    def _count_write(self, tier: str, value: torch.Tensor) -> None:
        """Account the links a copy of ``value`` into ``tier`` crosses."""
        if tier != "gpu" and value.device.type == "cuda":
            self._count("gpu->cpu", _nbytes(value))
        if tier == "disk":
            self._count("cpu->disk", _nbytes(value))

    def _fetch(self, tier: str, resident: torch.Tensor, dest: torch.device) -> torch.Tensor:
        if resident.device != dest or tier == "disk":
            self._count_read(tier, dest, _nbytes(resident))
        return self.storage[tier].fetch(resident, dest, non_blocking=self._cuda and self.policy.overlap)

    def _write(self, tier: str, resident: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` into a resident tensor; to a host tier on CUDA, on the store stream."""
        self._count_write(tier, value)
        if self._store_stream is None or tier == "gpu" or not value.is_cuda:
            self.storage[tier].write(resident, value)
            return
        self._store(value, lambda: self.storage[tier].write(resident, value, non_blocking=True))

    def _store(self, value: torch.Tensor, copy) -> None:
        """Run ``copy`` (a copy of the computed ``value`` to the host) on the store stream, after compute."""
        self._store_stream.wait_stream(torch.cuda.current_stream(self.device))  # value is computed
        with torch.cuda.stream(self._store_stream):
            copy()
            value.record_stream(self._store_stream)
            self._stores_done = self._store_stream.record_event()

    def _to_host(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` in page-locked host memory; on CUDA the copy runs on the store stream (see ``_stores_done``)."""
        if not value.is_cuda:
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self._store(value, lambda: host.copy_(value, non_blocking=True))
        return host

    def _wait_for_stores_on_host(self) -> None:
        """Before the host reads a host tier the store stream writes into."""
        if self._stores_done is not None:
            self._stores_done.synchronize()

    def _load(self, executor, stream, fn, *args, after_writes: bool = False) -> Future:
        """Run a fetch on an I/O thread and (CUDA) a copy stream; the future holds (result, event).

        ``after_writes``: the fetch reads tensors that compute or the store stream may have
        written (a cache prefix, parked hidden states). The copy stream then first waits for
        all the work both streams had been given when the fetch was submitted, so a cache
        prefix is never read before its last token has landed, wherever the cache lives.
        Weights are never written, so their loads wait for nothing.
        """
        waits = []
        if after_writes and stream is not None:
            waits.append(torch.cuda.current_stream(self.device).record_event())
            if self._stores_done is not None:
                waits.append(self._stores_done)

        def run():
            if stream is None:
                return fn(*args), None
            with torch.cuda.stream(stream):
                for event in waits:
                    stream.wait_event(event)
                result = fn(*args)
                event = stream.record_event()
            return result, event

        return executor.submit(run)

    def _wait(self, future: Future, on_host: bool = False):
        """The result of a fetch, ordered before what compute (or, ``on_host``, the CPU) does next."""
        result, event = future.result()
        if event is not None:
            if on_host:
                event.synchronize()
            else:
                torch.cuda.current_stream(self.device).wait_event(event)
                _record_stream(result, torch.cuda.current_stream(self.device))
        return result

    def _load_layer(self, index: int) -> dict[str, torch.Tensor]:
        """The weights of a model layer on the compute device, decompressed.

        On the CPU this runs on the weight I/O thread and only brings the bytes in: weights
        to decompress, or to convert to the compute dtype, are left as :class:`_Unpack` for the
        compute thread (:meth:`_ready`), whose OpenMP team has the cores. A second team started
        from the I/O thread would compete with it for the same cores.
        """
        weights = {}
        for placed in self.layers[index]:
            if index == 0 and placed.spec.local in self._gathered:
                continue  # its rows are gathered at home when the tokens are known
            parts = {name: self._fetch(placed.tier, t, self.device) for name, t in placed.parts.items()}
            if self._cuda:
                weights[placed.spec.local] = self._unpacked(placed, parts) if placed.compressed else parts["data"]
            elif placed.compressed or parts["data"].dtype != self.compute_dtype:
                weights[placed.spec.local] = _Unpack(placed, parts)
            else:
                weights[placed.spec.local] = parts["data"]
        return weights

    def _ready(self, weights: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A loaded layer's weights with what the I/O thread left packed unpacked, on the compute
        thread; once per layer (the dict is shared by the layer's GPU batches). The output
        embedding is left packed when it can be unpacked a slice at a time (:meth:`_logits`)."""
        for name, value in weights.items():
            if isinstance(value, _Unpack) and not (name == "lm_head.weight" and self._rows_unpackable(value.placed)):
                weights[name] = self._unpacked(value.placed, value.parts)
        return weights

    def _rows_unpackable(self, placed: PlacedWeight) -> bool:
        return not placed.compressed or keeps_rows(self.weight_compressor, placed.spec.shape, self.dtype)

    def _logits(self, weights: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the head; with a packed output embedding, a slice of its rows at a time.

        The output embedding is the largest weight (50,272 rows; 1.4 GB in float32 at OPT-30B's
        width): unpacked whole, it alone would take more memory than every other layer's
        buffers together. Its rows are unpacked into one small buffer in turn, each slice's
        logits computed before the next is unpacked.
        """
        packed = weights.get("lm_head.weight")
        if not isinstance(packed, _Unpack):
            return opt.head(self.spec, weights, x)
        features = opt.head_features(self.spec, weights, x)  # (B, e)
        vocab, width = packed.placed.spec.shape
        rows = max(1, min(vocab, _HEAD_SLICE_BYTES // (width * _itemsize(self.compute_dtype))))
        compressor = self.weight_compressor if packed.placed.compressed else _IDENTITY
        buffer = self._unpack_buffer("lm_head.weight/slice", (rows, width))
        logits_t = torch.empty(vocab, features.shape[0], dtype=self.compute_dtype)  # (vocab, B): slices contiguous
        for start in range(0, vocab, rows):
            stop = min(vocab, start + rows)
            parts = {name: part[start:stop] for name, part in packed.parts.items()}
            w = compressor.decompress_into(parts, buffer[: stop - start], self.dtype)
            torch.mm(w, features.t(), out=logits_t[start:stop])
        return logits_t.t()

    def _unpack_buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = self._unpack_buffers.get(name)
        if buffer is None or tuple(buffer.shape) != tuple(shape):
            buffer = self._unpack_buffers[name] = torch.empty(shape, dtype=self.compute_dtype)
        return buffer

    def _unpacked(self, placed: PlacedWeight, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """A compressed weight decompressed on the compute device.

        On the CPU it is unpacked in one pass into a buffer kept per weight name: a fresh
        tensor per load would be returned to the OS and faulted in again every layer, two to
        three times the cost of the unpacking. One buffer per name is enough: the compute
        thread unpacks a layer when it first uses it (:meth:`_ready`), and by then every task
        of the layer of the same kind before it is finished (a pending host attention of that
        layer is finished by the next layer, of the other kind). On CUDA the caching allocator
        already reuses memory, and the fused kernel writes a fresh tensor.
        """
        compressor = self.weight_compressor if placed.compressed else _IDENTITY  # or a dtype conversion
        if self._cuda:
            return compressor.decompress(parts, placed.spec.shape, self.dtype)
        return compressor.decompress_into(parts, self._unpack_buffer(placed.spec.local, placed.spec.shape), self.dtype)

    def _submit_layer(self, index: int) -> Future:
        if index in self._resident:
            future: Future = Future()
            future.set_result((self._resident[index], None))
            return future
        return self._load(self._weight_io, self._weight_stream, self._load_layer, index)

    # ------------------------------------------------------------------ cache

    def _cache_for(self, length: int) -> list[list[CacheUnit]]:
        """The KV cache for a block of ``length`` positions, reused from block to block.

        Allocating a host-resident cache means zero-filling and page-locking it (43 GB in the
        W3 workload), so it is allocated once per engine and kept; a block longer than every
        block before it makes it anew. Positions a block has not written are never read: the
        prefill writes the prompt's and each decode step writes its token before attending.
        """
        if self._cache is None or self._cache_length < length:
            if self._cache is not None:
                self._free_cache(self._cache)
                self._cache = None
            self._cache = self._allocate_cache(length)
            self._cache_length = length
        L, K, B = self.spec.num_layers, self.policy.num_gpu_batches, self.policy.gpu_batch_size
        shape = (length, B, self.spec.num_heads, self.spec.head_dim)
        self.stats.compression["cache_stored_bytes"] += 2 * L * K * self.cache_compressor.nbytes(shape, self.cache_dtype)
        self.stats.compression["cache_raw_bytes"] += 2 * L * K * _numel(shape) * _itemsize(self.cache_dtype)
        return self._cache

    def _allocate_cache(self, length: int) -> list[list[CacheUnit]]:
        """Allocate the KV cache: one unit per (decoder layer, GPU batch)."""
        L, K, B = self.spec.num_layers, self.policy.num_gpu_batches, self.policy.gpu_batch_size
        shape = (length, B, self.spec.num_heads, self.spec.head_dim)
        specs = self.cache_compressor.part_specs(shape, self.cache_dtype)
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
                        key = f"cache/{self._run_id}/{layer}/{batch}/{which}.{name}"
                        kv[which][name] = self.storage[tier].empty(key, part_shape, part_dtype)
                        keys.append(key)
                row.append(CacheUnit(tier, kv["k"], kv["v"], keys))
            units.append(row)
        self._note_memory()
        return units

    def _free_cache(self, units: list[list[CacheUnit]]) -> None:
        for row in units:
            for unit in row:
                for key in unit.keys:
                    self.storage[unit.tier].free(key)

    def _cache_resident_where_attended(self, unit: CacheUnit) -> bool:
        return self._tier_location(unit.tier) == self.attention_device

    def _reads_packed(self) -> bool:
        """Whether attention takes a compressed cache as it is (PackedKV) and dequantises it block
        by block, rather than the engine decompressing the whole prefix every step."""
        return self.attention.reads_packed_cache and not isinstance(self.cache_compressor, NoCompression)

    def _read_cache(self, unit: CacheUnit, length: int, dest: torch.device):
        """Keys and values of positions [0, length) on ``dest``: as (B, H, t, D) tensors (views where
        they already are), or, for an attention backend that reads packed caches, as PackedKV."""
        n, b = length, self.policy.gpu_batch_size
        shape = (n, b, self.spec.num_heads, self.spec.head_dim)
        out = []
        for parts in (unit.k, unit.v):
            moved = {name: self._fetch(unit.tier, t[:n], dest) for name, t in parts.items()}
            if self._reads_packed():
                out.append(PackedKV(moved, self.cache_compressor, shape, self.cache_dtype))
            else:
                out.append(self.cache_compressor.decompress(moved, shape, self.cache_dtype).permute(1, 2, 0, 3))
        return out[0], out[1]

    def _write_cache(self, unit: CacheUnit, start: int, k: torch.Tensor, v: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Compress and write new keys/values (B, H, n, D) at positions [start, start + n).

        Returns the packed parts of k and v, i.e. exactly what the cache now holds for them.
        """
        written = []
        for parts, new in ((unit.k, k), (unit.v, v)):
            packed = self.cache_compressor.compress(new.permute(2, 0, 1, 3).contiguous())
            for name, value in packed.items():
                self._write(unit.tier, parts[name][start:start + value.shape[0]], value)
            written.append(packed)
        return written

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        input_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: int | Sequence[int] | None = None,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """New tokens for every prompt, in order; a sequence ends after a ``stop`` token.

        With ``do_sample``, each prompt samples from its own random stream, drawn from ``seed``,
        its key (``keys[i]``; default its index ``i``) and its token ids: its tokens do not depend
        on the block size, on the other prompts or on their order.
        """
        prompts = self._check_prompts(input_ids, max_new_tokens)
        if keys is None:
            keys = [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise PromptError(f"keys: {len(keys)} keys for {len(prompts)} prompts")
        if do_sample and not temperature > 0:
            raise PromptError(f"generation.temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise PromptError(f"generation.top_p must be in (0, 1], got {top_p}")
        stops = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        sampling = _Sampling(do_sample, temperature, top_p, stops)
        outputs: list[list[int]] = []
        block_size = self.policy.block_size
        with torch.inference_mode(), self._threads_applied():
            for number, start in enumerate(range(0, len(prompts), block_size)):
                real = prompts[start:start + block_size]
                padded = real + [real[0]] * (block_size - len(real))  # outputs of padding are dropped
                streams = [_stream(seed or 0, str(key), ids) for key, ids in zip(keys[start:start + block_size], real)]
                streams += [streams[0]] * (block_size - len(real))
                tokens = self._generate_block(padded, max_new_tokens, sampling, streams, len(real))
                outputs.extend(tokens[: len(real)])
        return outputs

    def _threads_applied(self):
        """The engine's thread setting while it generates; the caller's is given back afterwards."""
        return self._threads.applied() if self._threads is not None else contextlib.nullcontext()

    def _update_threads(self) -> None:
        """Between steps: decide the thread count again when the machine's load may have changed."""
        if self._threads is not None:
            self.stats.threads = self._threads.update().to_dict()

    def _check_prompts(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PromptError(f"generation.max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.tolist()
        prompts = []
        vocab, limit = self.spec.vocab_size, self.spec.max_positions
        for i, ids in enumerate(input_ids):
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            if not ids:
                raise PromptError(f"prompt {i} is empty")
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise PromptError(f"prompt {i}: token id {bad!r} is outside the vocabulary [0, {vocab})")
            if len(ids) + max_new_tokens > limit + 1:  # the last new token needs no position (as in HF)
                raise PromptError(
                    f"prompt {i}: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                    f"{limit} positions (+1 for the last new token)"
                )
            prompts.append(ids)
        return prompts

    def _generate_block(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: "_Sampling",
        streams: list[bytes], num_real: int,
    ) -> list[list[int]]:
        B, K = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        prompt_len = max(map(len, prompts))
        total = prompt_len + max_new_tokens
        batches = []
        for k in range(K):
            rows = prompts[k * B:(k + 1) * B]
            ids = torch.full((B, prompt_len), self.spec.pad_token_id, dtype=torch.long)
            valid = torch.zeros((B, total), dtype=torch.bool)
            for r, row in enumerate(rows):
                ids[r, prompt_len - len(row):] = torch.tensor(row)
                valid[r, prompt_len - len(row):] = True
            padded = any(len(row) < prompt_len for row in rows)
            batches.append(GPUBatch(ids.to(self.device), valid.to(self.device), valid, ids, padded))
        block = Block(batches, prompt_len, split_by_percent([1] * K, self.policy.percents("act")),
                      self._cache_for(total), sampling, streams)
        done = torch.zeros(B * K, dtype=torch.bool, device=self.device)
        try:
            self._sync()
            started = time.perf_counter()
            for step in range(max_new_tokens):
                self._update_threads()
                self._run_step(block, step)
                new = torch.cat([b.outputs[-1] for b in batches])[:, 0]
                if sampling.stops:
                    done |= torch.isin(new, torch.tensor(sampling.stops, device=self.device))
                if step == 0:
                    self._sync()
                    prefill_end = time.perf_counter()
                    self.stats.prefill_time_s += prefill_end - started
                if sampling.stops and bool(done[:num_real].all()):
                    break
            self._sync()
            self.stats.decode_time_s += time.perf_counter() - prefill_end
        finally:
            # On an error, work handed to the worker threads and the device may still read the
            # cache and the batches' tensors: let it finish before they are reused or freed.
            for batch in batches:
                batch.pending = None
            for worker in (self._weight_io, self._cache_io, self._attention_io):
                wait([worker.submit(lambda: None)])  # one thread each, in order: all earlier work is done
            self._sync()
            self._note_memory()
            for k, tier in enumerate(block.act_tiers):
                self.storage[tier].free(self._act_key(k))
        tokens = torch.cat([torch.cat(b.outputs, dim=1) for b in batches]).tolist()
        results = [_cut_at_stop(row, sampling.stops) for row in tokens]
        self.stats.prompt_tokens += sum(len(p) for p in prompts[:num_real])
        self.stats.generated_tokens += sum(len(r) for r in results[:num_real])
        return results

    def _act_key(self, batch: int) -> str:
        return f"act/{self._run_id}/{batch}"

    def _run_step(self, block: Block, step: int) -> None:
        """One step (prefill when ``step == 0``) of a block, in the scheduler's order."""
        tasks = self.scheduler.order(self.spec.num_model_layers, len(block.batches))
        # Tokens in the cache before this step: the prompt, then one more per decode step.
        length = block.prompt_len if step == 0 else block.prompt_len + step - 1
        # Weights: the next layer in the order starts loading as soon as the current one
        # starts computing, so it has the whole layer (every GPU batch) to arrive in.
        loads = {tasks[0].layer: self._submit_layer(tasks[0].layer)}
        previous_layer_done = None  # compute-stream event: the layer before the current one is computed
        pending = self._prefetch(block, tasks[0], None, step, length)
        for t, (task, ahead) in enumerate(zip(tasks, _next_layers(tasks))):
            hidden_f, cache_f = pending
            following = tasks[t + 1] if t + 1 < len(tasks) else None
            if following is not None:
                # Issue the next task's I/O before computing this one, so the two overlap.
                pending = self._prefetch(block, following, task, step, length)
            batch = block.batches[task.batch]
            weights = self._ready(self._wait(loads[task.layer]))
            x = self._wait(hidden_f) if hidden_f is not None else self._hidden(batch)
            cached = self._wait(cache_f, on_host=self.attention_device.type == "cpu") if cache_f is not None else None
            out = self._compute(block, task, step, length, weights, x, cached)
            if ahead is not None and ahead not in loads:
                # At most three layers' weights in compute memory (the one finishing, this one,
                # the next): the host may not run further ahead of the device than that, or
                # buffers freed on the host but still in use on the device pile up.
                if previous_layer_done is not None:
                    previous_layer_done.synchronize()
                loads[ahead] = self._submit_layer(ahead)
            if following is None or following.layer != task.layer:
                del loads[task.layer]  # done with this layer: its buffers go once computed
                previous_layer_done = self._compute_event()
            if batch.pending is not None:
                continue  # its hidden states arrive when the host attention is finished
            if task.layer == self.spec.num_model_layers - 1:
                batch.hidden = None
            elif (following is not None and following.batch == task.batch) or block.act_tiers[task.batch] == "gpu":
                batch.hidden = out  # already where it is used next: no copy
            else:
                tier = block.act_tiers[task.batch]
                self._count_write(tier, out)
                batch.hidden = self.storage[tier].put(self._act_key(task.batch), out)

    def _compute_event(self):
        """An event marking all compute issued so far (None off CUDA, where compute is synchronous)."""
        return torch.cuda.current_stream(self.device).record_event() if self._cuda else None

    def _prefetch(self, block: Block, task: Task, previous: Task | None, step: int,
                  length: int) -> tuple[Future | None, Future | None]:
        """Start loading what ``task`` needs besides weights: its hidden states and cache prefix.

        Hidden states are fetched only when they were stored away (another batch ran in
        between and their home is not compute memory); the cache prefix only in decode, and
        only when attention runs away from the cache's home.
        """
        hidden = None
        tier = block.act_tiers[task.batch]
        if task.layer > 0 and tier != "gpu" and (previous is None or previous.batch != task.batch):
            resident = block.batches[task.batch].hidden
            hidden = self._load(self._cache_io, self._cache_stream, self._fetch, tier, resident, self.device,
                                after_writes=True)
        cache_future = None
        kind, layer = opt.layer_kind(self.spec, task.layer)
        if kind == "attn" and step > 0:
            unit = block.cache[layer][task.batch]
            if not self._cache_resident_where_attended(unit):
                cache_future = self._load(
                    self._cache_io, self._cache_stream, self._read_cache, unit, length, self.attention_device,
                    after_writes=True,
                )
        return hidden, cache_future

    def _compute(self, block: Block, task: Task, step: int, length: int, weights: dict[str, torch.Tensor],
                 x: torch.Tensor | None, cached) -> torch.Tensor | None:
        """Run one model layer for one GPU batch; returns its hidden states (None after the head,
        and None while a host attention computes them: ``batch.pending``)."""
        spec, batch = self.spec, block.batches[task.batch]
        kind, layer = opt.layer_kind(spec, task.layer)
        prefill = step == 0
        if kind == "embed":
            return self._embed(batch, prefill, length, weights)
        if kind == "mlp":
            return opt.mlp(spec, weights, x)
        if kind == "head":
            logits = self._logits(weights, x)
            B = self.policy.gpu_batch_size
            token = block.sampling.pick(logits, block.streams[task.batch * B:(task.batch + 1) * B], step)
            batch.outputs.append(token)
            batch.next_ids = token
            return None
        q, k, v = opt.attention_in(spec, weights, x)
        unit = block.cache[layer][task.batch]
        if prefill:
            attn = self.attention.prefill(q, k, v, self._valid(batch, batch.valid, length))
            self._write_cache(unit, 0, k, v)
        elif (self.host_attention_on_worker and self._cache_resident_where_attended(unit)
              and block.act_tiers[task.batch] == "gpu"):
            batch.pending = HostAttention(self._start_host_attention(unit, length, q, k, v, batch), x, weights)
            return None
        else:
            attn = self._decode_attention(unit, length, q, k, v, cached, self._valid(batch, batch.valid, length + 1))
        return opt.attention_out(spec, weights, x, attn)

    def _embed(self, batch: GPUBatch, prefill: bool, length: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding of this step's tokens; rows of tables that live off compute memory are gathered at home."""
        ids = batch.prompt_ids if prefill else batch.next_ids
        n = ids.shape[1]
        if not self._gathered:
            positions = opt.positions_from_mask(batch.valid[:, : length + (0 if prefill else 1)])[:, -n:]
            return opt.embed(self.spec, weights, ids, positions)
        # The row indices on the host: the prompt's are there already, a decoded token is
        # copied back from the device (a few bytes, once the sampler has produced it).
        host_ids = batch.prompt_ids_host if prefill else ids.cpu()
        positions = opt.positions_from_mask(batch.valid_host[:, : length + (0 if prefill else 1)])[:, -n:]
        rows = {}
        for name, index in opt.embedding_rows(host_ids, positions).items():
            placed = self._gathered.get(name)
            rows[name] = (self._gather_rows(placed, index) if placed is not None
                          else F.embedding(index.to(self.device), weights[name]))
        return opt.embed_rows(self.spec, weights, rows)

    def _gather_rows(self, placed: PlacedWeight, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (B, n) of an embedding table, gathered where it lives, on the compute device."""
        flat = index.reshape(-1)
        home = self._tier_location(placed.tier)
        parts = {name: self._fetch(placed.tier, t.index_select(0, flat.to(home)), self.device)
                 for name, t in placed.parts.items()}
        shape = (flat.numel(), placed.spec.shape[1])
        rows = self.weight_compressor.decompress(parts, shape, self.dtype) if placed.compressed else parts["data"]
        return rows.to(self.compute_dtype).reshape(*index.shape, shape[1])

    def _valid(self, batch: GPUBatch, valid: torch.Tensor, length: int) -> torch.Tensor | None:
        """``valid[:, :length]`` for attention; None where nothing is padding and the backend accepts
        that, so that on a GPU ``scaled_dot_product_attention`` may choose its fused kernels.
        Decided from the prompts' lengths on the host, never by reading the mask on the device."""
        if not batch.padded and self.attention.accepts_unmasked:
            return None
        return valid[:, :length]

    def _hidden(self, batch: GPUBatch) -> torch.Tensor | None:
        """The batch's hidden states, finishing its host attention first when one is pending."""
        pending = batch.pending
        if pending is not None:
            batch.pending = None
            attn = pending.future.result().to(self.device, non_blocking=True)
            batch.hidden = opt.attention_out(self.spec, pending.weights, pending.x, attn)
        return batch.hidden

    def _start_host_attention(self, unit: CacheUnit, length: int, q: torch.Tensor, k_new: torch.Tensor,
                              v_new: torch.Tensor, batch: GPUBatch) -> Future:
        """Decode attention on the attention worker, over a cache that lives on the host.

        The new keys and values go into the cache and the query to the host on the store
        stream; the worker waits for those copies alone (an event), never for the whole device,
        and attends while the main thread issues the next tasks.
        """
        self._write_cache(unit, length, k_new, v_new)
        q_host = self._to_host(q)
        landed = self._stores_done if self._cuda else None
        valid = self._valid(batch, batch.valid_host, length + 1)
        pin = self._cuda

        def attend() -> torch.Tensor:
            if landed is not None:
                landed.synchronize()
            k, v = self._read_cache(unit, length + 1, self.attention_device)
            out = self.attention.decode(q_host, k, v, valid)
            return out.pin_memory() if pin else out  # pinned: the copy back runs asynchronously

        return self._attention_io.submit(attend)

    def _decode_attention(self, unit, length, q, k_new, v_new, cached, valid) -> torch.Tensor:
        """Attention of the new token; the cache is read where it lives when attention runs there."""
        dest = self.attention_device
        if self._cache_resident_where_attended(unit):
            self._write_cache(unit, length, k_new, v_new)
            if dest.type == "cpu":
                self._wait_for_stores_on_host()
            k, v = self._read_cache(unit, length + 1, dest)
        else:
            # The prefix was prefetched to the attention device; append the new token to it as
            # the cache holds it (through the cache compressor), as a read of the cache would.
            shape = (1, self.policy.gpu_batch_size, self.spec.num_heads, self.spec.head_dim)
            written = [{n: p.to(dest) for n, p in packed.items()} for packed in self._write_cache(unit, length, k_new, v_new)]
            if self._reads_packed():  # still packed: join the parts, compressed bytes only
                k, v = (PackedKV({n: torch.cat([prefix.parts[n], new[n]]) for n in new}, self.cache_compressor,
                                 (length + 1, *shape[1:]), self.cache_dtype)
                        for prefix, new in zip(cached, written))
            else:
                stored = [self.cache_compressor.decompress(new, shape, self.cache_dtype) for new in written]
                k = torch.cat([cached[0], stored[0].permute(1, 2, 0, 3)], dim=2)
                v = torch.cat([cached[1], stored[1].permute(1, 2, 0, 3)], dim=2)
        out = self.attention.decode(q.to(dest), k, v, None if valid is None else valid.to(dest))
        return out.to(self.device)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release caches, buffers and scratch files; converted disk weights stay for reuse."""
        self._weight_io.shutdown(wait=True)
        self._cache_io.shutdown(wait=True)
        self._attention_io.shutdown(wait=True)
        self._sync()  # no copy may still read or write what is freed below
        if self._cache is not None:
            self._free_cache(self._cache)
            self._cache = None
        for backend in self.storage.values():
            backend.close()
        self.layers.clear()
        self._resident.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Sampling:
    do_sample: bool
    temperature: float
    top_p: float
    stops: list[int]

    def pick(self, logits: torch.Tensor, streams: Sequence[bytes], step: int) -> torch.Tensor:
        """Next token ids (B, 1): greedy, or sampled with temperature and nucleus (top-p).

        Row r draws one uniform number from its own stream at this step (:func:`_uniform`) and
        takes the token where it falls in the cumulative distribution (inverse transform
        sampling): what a row draws depends on nothing but its stream and the step.
        """
        logits = logits.float()
        if not self.do_sample:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        cdf = probs.double().cumsum(dim=-1)
        u = torch.tensor([_uniform(stream, step) for stream in streams], dtype=torch.float64, device=cdf.device)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        return token.clamp_(max=probs.shape[-1] - 1)


def _stream(seed: int, key: str, input_ids: Sequence[int]) -> bytes:
    """A prompt's random stream: a digest of the seed, its key and its token ids."""
    import hashlib

    text = f"{seed}\0{key}\0{','.join(map(str, input_ids))}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest()


def _uniform(stream: bytes, step: int) -> float:
    """The ``step``-th draw of a stream, uniform in [0, 1): 53 bits of a keyed digest (a counter-based generator)."""
    import hashlib

    value = int.from_bytes(hashlib.blake2b(step.to_bytes(8, "little"), key=stream, digest_size=8).digest(), "little")
    return (value >> 11) / float(1 << 53)


def _next_layers(tasks: list[Task]) -> list[int | None]:
    """For each task, the layer of the first later task on another layer (None at the end)."""
    ahead: list[int | None] = [None] * len(tasks)
    following = None
    for t in range(len(tasks) - 2, -1, -1):
        if tasks[t + 1].layer != tasks[t].layer:
            following = tasks[t + 1].layer
        ahead[t] = following
    return ahead


def _cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def _release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the OS (glibc only; elsewhere a no-op).

    Converting a model tensor by tensor frees a few tens of megabytes per tensor, which glibc
    keeps in its heap; without this a 100 %-on-disk conversion ends holding a third of the
    model in anonymous memory it no longer uses.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - present on glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _record_stream(result, stream) -> None:
    """Tell the caching allocator that tensors made on the copy stream are used on ``stream``."""
    if isinstance(result, torch.Tensor):
        if result.is_cuda:
            result.record_stream(stream)
    elif isinstance(result, dict):
        for value in result.values():
            _record_stream(value, stream)
    elif isinstance(result, (tuple, list)):
        for value in result:
            _record_stream(value, stream)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexGenError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        # With an index, the device compares equal to the .device of the tensors made there.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_engine(
    model: str | Path,
    policy: Policy | None = None,
    plugins: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    offload_dir: str | Path | None = None,
    dtype: str = "auto",
    seed: int = 0,
    threads: int | str | None = None,
) -> Engine:
    """Build an engine for an HF OPT checkpoint directory or a synthetic OPT size name.

    ``dtype``: the model's dtype; ``auto`` is float16 on CUDA, bfloat16 on a CPU with native
    bfloat16 matrix instructions, float32 on other CPUs (:mod:`flexgen.dtypes`, which also says
    when half precision is computed in float32). ``threads``: intra-op threads to compute with;
    None or ``"auto"`` lets the engine decide (:mod:`flexgen.threads`), a positive integer fixes it.
    """
    if dtype not in DTYPE_CHOICES:
        raise FlexGenError(f"model.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if policy is None:
        policy = Policy()
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a flexgen.Policy, got {type(policy).__name__}")
    torch_dtype = DTYPES[dtype]
    source = open_source(model, dtype=torch_dtype, seed=seed)
    folder = Path(offload_dir) if offload_dir is not None else default_offload_dir()
    setting = parse_threads(threads, "threads")
    return Engine(source, policy, dict(plugins or {}), device, folder, torch_dtype, threads=setting)
