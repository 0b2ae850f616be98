"""The engine: runs the zig-zag block schedule over weights, caches and activations in tiers.

One ``generate`` call cuts the prompts into *blocks* of ``num_gpu_batches × gpu_batch_size``
sequences. For each block, each step (the prefill, then one token at a time) is a list of
tasks (model layer j, GPU batch k) in the order the Scheduler gives. Moving data overlaps
computing it: the next layer's weights start loading when the current layer starts (once per
layer and step under zig-zag), and while task t computes, a second I/O thread fetches what
task t+1 needs besides weights: the cache prefix of its (layer, batch) when attention runs
away from the cache's home, and its hidden states when they live in another tier. On CUDA
each kind of copy has its own stream (weights, cache loads, stores to host tiers), and
compute waits on events, never on the whole device.

The engine talks to storage, compression, attention and the model only through their
interfaces; it knows which tier holds what, and when to move it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexgen import registry
from flexgen.compression.none import NoCompression
from flexgen.errors import FlexGenError, PluginError, PolicyError, PromptError
from flexgen.models import opt
from flexgen.models.checkpoint import WeightSource, open_source
from flexgen.paths import cache_root
from flexgen.policy import TIERS, Policy, split_by_percent
from flexgen.scheduling.base import Task

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
class CacheUnit:
    """The KV cache of one (decoder layer, GPU batch): parts of k and v, shaped (T, B, H, ...)."""

    tier: str
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    keys: list[str]


@dataclass
class GPUBatch:
    """The state of one GPU batch of a block between tasks."""

    prompt_ids: torch.Tensor  # (B, n) left-padded, on the compute device
    valid: torch.Tensor  # (B, T) bool: real tokens so far and to come
    next_ids: torch.Tensor | None = None  # (B, 1) the tokens to embed in this step
    hidden: torch.Tensor | None = None  # resident in the batch's activation tier
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
    ) -> None:
        self.spec = source.spec
        self.policy = policy
        self.device = device
        self.dtype = dtype
        self.offload_dir = offload_dir
        self.plugins = {**DEFAULT_PLUGINS, **{k: v for k, v in plugins.items() if v is not None}}
        unknown = sorted(set(self.plugins) - set(DEFAULT_PLUGINS))
        if unknown:
            raise PluginError(f"unknown plugins key {unknown[0]!r}; keys: {', '.join(DEFAULT_PLUGINS)}")
        self.stats = EngineStats()
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
        self._run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

        self.layers: list[list[PlacedWeight]] = []
        self._resident: dict[int, dict[str, torch.Tensor]] = {}  # layers needing no load at all
        self._place_weights(source)

    # ------------------------------------------------------------------ placement

    def _check_cache_compressor(self) -> None:
        shape = (3, 2, self.spec.num_heads, self.spec.head_dim)
        for name, (part_shape, _) in self.cache_compressor.part_specs(shape, self.dtype).items():
            if tuple(part_shape[:3]) != shape[:3]:
                raise PluginError(
                    f"plugins.cache_compressor: part {name!r} does not keep the (token, batch, head) axes; "
                    "a cache compressor must group along the last axis"
                )

    def _tier_location(self, tier: str) -> torch.device:
        """The device whose memory a tier's tensors can be used from without a copy."""
        return self.device if tier == "gpu" else torch.device("cpu")

    def _place_weights(self, source: WeightSource) -> None:
        """Put every weight in its tier, layer by layer, converting disk-tier tensors once.

        The tensors of one layer are read (or drawn, for synthetic weights), cast, compressed
        and stored on a few threads at once; layers go one after another, so memory holds at
        most one layer in flight.
        """
        compressor_id = repr(registry.parse_spec(self.plugins["weight_compressor"], "plugins.weight_compressor"))
        folder = f"weights/{source.fingerprint()}-{str(self.dtype).removeprefix('torch.')}-{_short_hash(compressor_id)}"
        percents = self.policy.percents("weights")
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexgen-place") as pool:
            for index in range(self.spec.num_model_layers):
                specs = opt.layer_weights(self.spec, index)
                tiers = split_by_percent([_numel(w.shape) for w in specs], percents)
                placed = list(pool.map(
                    lambda weight, tier: self._place_one(source, weight, tier, f"{folder}/{weight.name}"),
                    specs, tiers,
                ))
                self._register_layer(index, placed)
        self._note_memory()

    def _register_layer(self, index: int, placed: list[PlacedWeight]) -> None:
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
            tensor = source.get(weight).to(self.dtype)
            if self._prefers_column_major(weight, tier, compressed):
                tensor = tensor.t().contiguous().t()
            packed = compressor.compress(tensor)
            del tensor
            parts = {name: backend.put(f"{key}.{name}", packed[name]) for name in part_names}
            del packed
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
        self._store_stream.wait_stream(torch.cuda.current_stream(self.device))  # value is computed
        with torch.cuda.stream(self._store_stream):
            self.storage[tier].write(resident, value, non_blocking=True)
            value.record_stream(self._store_stream)
            self._stores_done = torch.cuda.Event()
            self._stores_done.record(self._store_stream)

    def _wait_for_stores_on_host(self) -> None:
        """Before the host reads a host tier the store stream writes into."""
        if self._stores_done is not None:
            self._stores_done.synchronize()

    def _load(self, executor, stream, fn, *args) -> Future:
        """Run a fetch on an I/O thread and (CUDA) a copy stream; the future holds (result, event).

        The copy stream first waits for the stores issued before this fetch was submitted, so
        a cache prefix is never read before its last token has landed.
        """
        stores = self._stores_done

        def run():
            if stream is None:
                return fn(*args), None
            with torch.cuda.stream(stream):
                if stores is not None:
                    stream.wait_event(stores)
                result = fn(*args)
                event = torch.cuda.Event()
                event.record(stream)
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
        """The weights of a model layer on the compute device, decompressed."""
        weights = {}
        for placed in self.layers[index]:
            parts = {name: self._fetch(placed.tier, t, self.device) for name, t in placed.parts.items()}
            if placed.compressed:
                weights[placed.spec.local] = self.weight_compressor.decompress(parts, placed.spec.shape, self.dtype)
            else:
                weights[placed.spec.local] = parts["data"]
        return weights

    def _submit_layer(self, index: int) -> Future:
        if index in self._resident:
            future: Future = Future()
            future.set_result((self._resident[index], None))
            return future
        return self._load(self._weight_io, self._weight_stream, self._load_layer, index)

    # ------------------------------------------------------------------ cache

    def _allocate_cache(self, length: int) -> list[list[CacheUnit]]:
        """Preallocate the KV cache of a block: one unit per (decoder layer, GPU batch)."""
        L, K, B = self.spec.num_layers, self.policy.num_gpu_batches, self.policy.gpu_batch_size
        shape = (length, B, self.spec.num_heads, self.spec.head_dim)
        specs = self.cache_compressor.part_specs(shape, self.dtype)
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
                self.stats.compression["cache_stored_bytes"] += 2 * self.cache_compressor.nbytes(shape, self.dtype)
                self.stats.compression["cache_raw_bytes"] += 2 * _numel(shape) * _itemsize(self.dtype)
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

    def _read_cache(self, unit: CacheUnit, length: int, dest: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) on ``dest``, decompressed, as (B, H, t, D)."""
        n, b = length, self.policy.gpu_batch_size
        shape = (n, b, self.spec.num_heads, self.spec.head_dim)
        out = []
        for parts in (unit.k, unit.v):
            moved = {name: self._fetch(unit.tier, t[:n], dest) for name, t in parts.items()}
            out.append(self.cache_compressor.decompress(moved, shape, self.dtype).permute(1, 2, 0, 3))
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
        with torch.inference_mode():
            for number, start in enumerate(range(0, len(prompts), block_size)):
                real = prompts[start:start + block_size]
                padded = real + [real[0]] * (block_size - len(real))  # outputs of padding are dropped
                streams = [_stream(seed or 0, str(key), ids) for key, ids in zip(keys[start:start + block_size], real)]
                streams += [streams[0]] * (block_size - len(real))
                tokens = self._generate_block(padded, max_new_tokens, sampling, streams, len(real))
                outputs.extend(tokens[: len(real)])
        return outputs

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
            batches.append(GPUBatch(ids.to(self.device), valid.to(self.device)))
        block = Block(batches, prompt_len, split_by_percent([1] * K, self.policy.percents("act")),
                      self._allocate_cache(total), sampling, streams)
        done = torch.zeros(B * K, dtype=torch.bool, device=self.device)
        try:
            self._sync()
            started = time.perf_counter()
            for step in range(max_new_tokens):
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
            self._note_memory()
            self._free_cache(block.cache)
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
        pending = self._prefetch(block, tasks[0], None, step, length)
        for t, (task, ahead) in enumerate(zip(tasks, _next_layers(tasks))):
            hidden_f, cache_f = pending
            following = tasks[t + 1] if t + 1 < len(tasks) else None
            if following is not None:
                # Issue the next task's I/O before computing this one, so the two overlap.
                pending = self._prefetch(block, following, task, step, length)
            batch = block.batches[task.batch]
            # Take this layer's weights (letting go of the previous layer's) before asking for
            # the next layer's: compute memory holds two layers, never three. The weight
            # thread could not start the next load earlier anyway: it was busy with this one.
            weights = self._wait(loads[task.layer])
            if ahead is not None and ahead not in loads:
                loads[ahead] = self._submit_layer(ahead)
            if following is None or following.layer != task.layer:
                del loads[task.layer]  # done with this layer: its buffers go once computed
            x = self._wait(hidden_f) if hidden_f is not None else batch.hidden
            cached = self._wait(cache_f, on_host=self.attention_device.type == "cpu") if cache_f is not None else None
            out = self._compute(block, task, step, length, weights, x, cached)
            if task.layer == self.spec.num_model_layers - 1:
                batch.hidden = None
            elif (following is not None and following.batch == task.batch) or block.act_tiers[task.batch] == "gpu":
                batch.hidden = out  # already where it is used next: no copy
            else:
                tier = block.act_tiers[task.batch]
                self._count_write(tier, out)
                batch.hidden = self.storage[tier].put(self._act_key(task.batch), out)

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
            hidden = self._load(self._cache_io, self._cache_stream, self._fetch, tier, resident, self.device)
        cache_future = None
        kind, layer = opt.layer_kind(self.spec, task.layer)
        if kind == "attn" and step > 0:
            unit = block.cache[layer][task.batch]
            if not self._cache_resident_where_attended(unit):
                cache_future = self._load(
                    self._cache_io, self._cache_stream, self._read_cache, unit, length, self.attention_device
                )
        return hidden, cache_future

    def _compute(self, block: Block, task: Task, step: int, length: int, weights: dict[str, torch.Tensor],
                 x: torch.Tensor | None, cached) -> torch.Tensor | None:
        """Run one model layer for one GPU batch; returns its hidden states (None after the head)."""
        spec, batch = self.spec, block.batches[task.batch]
        kind, layer = opt.layer_kind(spec, task.layer)
        prefill = step == 0
        if kind == "embed":
            ids = batch.prompt_ids if prefill else batch.next_ids
            n = ids.shape[1]
            valid = batch.valid[:, : length + (0 if prefill else 1)]
            positions = opt.positions_from_mask(valid)[:, -n:]
            return opt.embed(spec, weights, ids, positions)
        if kind == "mlp":
            return opt.mlp(spec, weights, x)
        if kind == "head":
            logits = opt.head(spec, weights, x)
            B = self.policy.gpu_batch_size
            token = block.sampling.pick(logits, block.streams[task.batch * B:(task.batch + 1) * B], step)
            batch.outputs.append(token)
            batch.next_ids = token
            return None
        q, k, v = opt.attention_in(spec, weights, x)
        unit = block.cache[layer][task.batch]
        if prefill:
            valid = batch.valid[:, :length]
            attn = self.attention.prefill(q, k, v, valid)
            self._write_cache(unit, 0, k, v)
        else:
            attn = self._decode_attention(unit, length, q, k, v, cached, batch.valid[:, : length + 1])
        return opt.attention_out(spec, weights, x, attn)

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
            stored = [
                self.cache_compressor.decompress({n: p.to(dest) for n, p in packed.items()}, shape, self.dtype)
                for packed in self._write_cache(unit, length, k_new, v_new)
            ]
            k = torch.cat([cached[0], stored[0].permute(1, 2, 0, 3)], dim=2)
            v = torch.cat([cached[1], stored[1].permute(1, 2, 0, 3)], dim=2)
        out = self.attention.decode(q.to(dest), k, v, valid.to(dest))
        return out.to(self.device)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Release caches, buffers and scratch files; converted disk weights stay for reuse."""
        self._weight_io.shutdown(wait=True)
        self._cache_io.shutdown(wait=True)
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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexGenError(f"device {str(device)!r} asked for, but CUDA is not available here")
    return device


def load_engine(
    model: str | Path,
    policy: Policy | None = None,
    plugins: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    offload_dir: str | Path | None = None,
    dtype: str = "float16",
    seed: int = 0,
) -> Engine:
    """Build an engine for an HF OPT checkpoint directory or a synthetic OPT size name."""
    if dtype not in DTYPES:
        raise FlexGenError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if policy is None:
        policy = Policy()
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a flexgen.Policy, got {type(policy).__name__}")
    torch_dtype = DTYPES[dtype]
    source = open_source(model, dtype=torch_dtype, seed=seed)
    folder = Path(offload_dir) if offload_dir is not None else default_offload_dir()
    return Engine(source, policy, dict(plugins or {}), resolve_device(device), folder, torch_dtype)
