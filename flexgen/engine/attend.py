"""Where a decode step's attention runs, and over which copy of the cache.

Three cases, decided per (layer, GPU batch) by where its cache unit lives and where the
attention backend runs:

* the cache lives where attention runs (a GPU cache with GPU attention, a host cache with
  CPU delegation): the new token is written, and attention reads the cache in place;
* the cache lives elsewhere: its prefix was prefetched while the task before computed
  (:mod:`flexgen.engine.loop`), and the new token is appended to that copy as a read of the
  cache would return it;
* a host cache, CPU attention and a GPU computing the rest: attention runs on a worker
  thread (:meth:`DecodeAttention.start_on_host`), so the GPU computes the other GPU
  batches meanwhile, and the loop finishes it when the batch is next used.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.engine.block import GPUBatch
from flexgen.engine.kv_cache import CacheUnit, KVCache
from flexgen.engine.transfers import Transfers, executor


class DecodeAttention:
    """Runs decode (and prefill) attention through the backend, next to the cache it reads."""

    def __init__(self, attention: AttentionBackend, attention_device: torch.device, device: torch.device,
                 cache: KVCache, transfers: Transfers) -> None:
        self.attention = attention
        self.attention_device = attention_device
        self.device = device
        self.cache = cache
        self.transfers = transfers
        self.worker = executor("flexgen-attention")

    def valid(self, batch: GPUBatch, valid: torch.Tensor, length: int, start: int = 0) -> torch.Tensor | None:
        """``valid[:, start:length]`` for attention; None where nothing is padding and the backend accepts
        that, so that on a GPU ``scaled_dot_product_attention`` may choose its fused kernels.
        Decided from the prompts' lengths on the host, never by reading the mask on the device.
        (Positions before ``start`` are outside a sliding window: never read, so never masked.)"""
        if not batch.padded and self.attention.accepts_unmasked:
            return None
        return valid[:, start:length]

    def grouped(self, k, v):
        """k, v as the backend takes them: as they are (KV heads) for a backend that accepts grouped-query
        attention, else each KV head repeated for its group of query heads (a copy: the price of a
        backend written before GQA)."""
        group = self.cache.spec.num_heads // self.cache.geometry[0].num_kv_heads
        if group == 1 or self.attention.accepts_grouped_kv:
            return k, v
        return tuple(_decompressed(x).repeat_interleave(group, dim=1) for x in (k, v))

    def prefill(self, unit: CacheUnit, batch: GPUBatch, length: int, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Attention over the prompt, whose keys and values then go into the cache."""
        valid = self.valid(batch, batch.valid, length)
        window = self.cache.geometry[layer].window
        gk, gv = self.grouped(k, v)
        if window is None or window >= length:
            out = self.attention.prefill(q, gk, gv, valid)
        else:  # the window is passed only where it matters, so backends written before it still run
            if valid is None:
                valid = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
            out = self.attention.prefill(q, gk, gv, valid, window=window)
        self.cache.write(unit, 0, k, v)
        return out

    def decode(self, unit: CacheUnit, batch: GPUBatch, length: int, q: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor, prefix, layer: int = 0) -> torch.Tensor:
        """Attention of the new token, on the compute device; the cache is read where it lives when
        attention runs there, else ``prefix`` (prefetched) is used with the new token appended.
        Under a sliding window only the window's positions are read (``prefix`` holds only those)."""
        dest = self.attention_device
        start = self.cache.window_start(layer, length + 1)
        valid = self.valid(batch, batch.valid, length + 1, start)
        if self.cache.resident_where_attended(unit):
            self.cache.write(unit, length, k_new, v_new)
            if dest.type == "cpu":
                self.transfers.wait_for_stores_on_host()
            k, v = self.cache.read(unit, length + 1, dest, start)
        else:
            k, v = self.cache.append(prefix, self.cache.write(unit, length, k_new, v_new), length - start, dest)
        k, v = self.grouped(k, v)
        out = self.attention.decode(q.to(dest), k, v, None if valid is None else valid.to(dest))
        return out.to(self.device)

    def start_on_host(self, unit: CacheUnit, batch: GPUBatch, length: int, q: torch.Tensor, k_new: torch.Tensor,
                      v_new: torch.Tensor, layer: int = 0) -> Future:
        """Decode attention on the attention worker, over a cache that lives on the host.

        The new keys and values go into the cache and the query to the host on the store
        stream; the worker waits for those copies alone (an event), never for the whole device,
        and attends while the main thread issues the next tasks.
        """
        self.cache.write(unit, length, k_new, v_new)
        q_host = self.transfers.to_host(q)
        landed = self.transfers.stores_done if self.transfers.cuda else None
        start = self.cache.window_start(layer, length + 1)
        valid = self.valid(batch, batch.valid_host, length + 1, start)
        pin = self.transfers.cuda

        def attend() -> torch.Tensor:
            if landed is not None:
                landed.synchronize()
            k, v = self.grouped(*self.cache.read(unit, length + 1, self.attention_device, start))
            out = self.attention.decode(q_host, k, v, valid)
            return out.pin_memory() if pin else out  # pinned: the copy back runs asynchronously

        return self.worker.submit(attend)

    def close(self) -> None:
        self.worker.shutdown(wait=True)


def _decompressed(x) -> torch.Tensor:
    return x.decompress() if isinstance(x, PackedKV) else x
