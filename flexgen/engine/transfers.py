"""Transfers: every copy between tiers, the threads and CUDA streams they run on, and their bytes.

Weight loads and cache/activation loads each have an I/O thread and, on CUDA, a stream of
their own, so a layer's weights loading ahead never delay the next batch's cache; copies back
to host tiers run on a store stream. Compute waits on events, never on the whole device.
Each copy is counted on the links it crosses (:class:`~flexgen.engine.stats.EngineStats`),
so the cost model's byte counts can be checked against what really moved.

Nothing here knows what a tensor means: placement, the KV cache and the loop say what to
move and when; this room says how, and in which order relative to compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from flexgen.engine.sizes import nbytes
from flexgen.engine.stats import EngineStats
from flexgen.policy import Policy
from flexgen.storage.base import StorageBackend


class _Inline:
    """An executor that runs work at once: the engine without overlap."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def executor(name: str) -> ThreadPoolExecutor:
    """A single-threaded executor: the work given to it runs in order."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


class Transfers:
    """Copies between tiers on I/O threads and streams, ordered after compute by events."""

    def __init__(self, storage: Mapping[str, StorageBackend], device: torch.device, policy: Policy,
                 stats: EngineStats) -> None:
        self.storage = storage
        self.device = device
        self.stats = stats
        self.cuda = device.type == "cuda"
        #: copies may be asynchronous (CUDA with overlap): the caller orders them by events
        self.non_blocking = self.cuda and policy.overlap
        overlap_streams = self.cuda and policy.overlap
        self.weight_stream = torch.cuda.Stream(device) if overlap_streams else None
        self.cache_stream = torch.cuda.Stream(device) if overlap_streams else None
        self.store_stream = torch.cuda.Stream(device) if overlap_streams else None
        #: the last store issued on the store stream (None before the first)
        self.stores_done: torch.cuda.Event | None = None
        self.weight_io = executor("flexgen-weights") if policy.overlap else _Inline()
        self.cache_io = executor("flexgen-cache") if policy.overlap else _Inline()

    # ------------------------------------------------------------------ byte accounting

    def count_read(self, tier: str, dest: torch.device, size: int) -> None:
        """Account the links a copy from ``tier`` to ``dest`` crosses."""
        if tier == "disk":
            self.stats.count("disk->cpu", size)
        if dest.type == "cuda" and tier != "gpu":
            self.stats.count("cpu->gpu", size)
        if dest.type == "cpu" and tier == "gpu" and self.cuda:
            self.stats.count("gpu->cpu", size)

    def count_write(self, tier: str, value: torch.Tensor) -> None:
        """Account the links a copy of ``value`` into ``tier`` crosses."""
        if tier != "gpu" and value.device.type == "cuda":
            self.stats.count("gpu->cpu", nbytes(value))
        if tier == "disk":
            self.stats.count("cpu->disk", nbytes(value))

    # ------------------------------------------------------------------ copies

    def fetch(self, tier: str, resident: torch.Tensor, dest: torch.device) -> torch.Tensor:
        """A tensor of ``tier`` usable on ``dest`` (itself where no copy is needed)."""
        if resident.device != dest or tier == "disk":
            self.count_read(tier, dest, nbytes(resident))
        return self.storage[tier].fetch(resident, dest, non_blocking=self.non_blocking)

    def write(self, tier: str, resident: torch.Tensor, value: torch.Tensor) -> None:
        """Copy ``value`` into a resident tensor; to a host tier on CUDA, on the store stream."""
        self.count_write(tier, value)
        if self.store_stream is None or tier == "gpu" or not value.is_cuda:
            self.storage[tier].write(resident, value)
            return
        self.store(value, lambda: self.storage[tier].write(resident, value, non_blocking=True))

    def put(self, tier: str, key: str, value: torch.Tensor) -> torch.Tensor:
        """Store a computed tensor under ``key`` in ``tier``, counted."""
        self.count_write(tier, value)
        return self.storage[tier].put(key, value)

    def store(self, value: torch.Tensor, copy: Callable[[], Any]) -> None:
        """Run ``copy`` (a copy of the computed ``value`` to the host) on the store stream, after compute."""
        self.store_stream.wait_stream(torch.cuda.current_stream(self.device))  # value is computed
        with torch.cuda.stream(self.store_stream):
            copy()
            value.record_stream(self.store_stream)
            self.stores_done = self.store_stream.record_event()

    def to_host(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` in page-locked host memory; on CUDA the copy runs on the store stream (see ``stores_done``)."""
        if not value.is_cuda:
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        self.store(value, lambda: host.copy_(value, non_blocking=True))
        return host

    def wait_for_stores_on_host(self) -> None:
        """Before the host reads a host tier the store stream writes into."""
        if self.stores_done is not None:
            self.stores_done.synchronize()

    # ------------------------------------------------------------------ loads on I/O threads

    def load_weights(self, fn: Callable[..., Any], *args) -> Future:
        """Run a weight fetch on the weight thread and stream. Weights are never written, so
        their loads wait for nothing."""
        return self._load(self.weight_io, self.weight_stream, fn, *args, after_writes=False)

    def after_weight_loads(self, fn: Callable[..., Any], *args) -> Future:
        """Run ``fn(*args)`` on the weight I/O thread, after the loads given to it before (no stream)."""
        return self.weight_io.submit(fn, *args)

    def load_written(self, fn: Callable[..., Any], *args) -> Future:
        """Run a fetch of tensors that compute or the store stream may have written (a cache
        prefix, parked hidden states) on the cache thread and stream.

        The copy stream first waits for all the work both streams had been given when the
        fetch was submitted, so a cache prefix is never read before its last token has
        landed, wherever the cache lives.
        """
        return self._load(self.cache_io, self.cache_stream, fn, *args, after_writes=True)

    def _load(self, worker, stream, fn, *args, after_writes: bool) -> Future:
        """Run ``fn(*args)`` on an I/O thread and (CUDA) a copy stream; the future holds (result, event)."""
        waits = []
        if after_writes and stream is not None:
            waits.append(torch.cuda.current_stream(self.device).record_event())
            if self.stores_done is not None:
                waits.append(self.stores_done)

        def run():
            if stream is None:
                return fn(*args), None
            with torch.cuda.stream(stream):
                for event in waits:
                    stream.wait_event(event)
                result = fn(*args)
                event = stream.record_event()
            return result, event

        return worker.submit(run)

    def wait(self, future: Future, on_host: bool = False):
        """The result of a load, ordered before what compute (or, ``on_host``, the CPU) does next."""
        result, event = future.result()
        if event is not None:
            if on_host:
                event.synchronize()
            else:
                torch.cuda.current_stream(self.device).wait_event(event)
                _record_stream(result, torch.cuda.current_stream(self.device))
        return result

    # ------------------------------------------------------------------ ordering

    def compute_event(self):
        """An event marking all compute issued so far (None off CUDA, where compute is synchronous)."""
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    def sync(self) -> None:
        """Wait for everything issued to the device (nothing to wait for off CUDA)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def drain(self, *others) -> None:
        """Wait until every thread (these and ``others``, single-threaded executors) has done the work
        it was given: one empty task each, run in order after it."""
        for worker in (self.weight_io, self.cache_io, *others):
            wait([worker.submit(lambda: None)])

    def close(self) -> None:
        self.weight_io.shutdown(wait=True)
        self.cache_io.shutdown(wait=True)


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
