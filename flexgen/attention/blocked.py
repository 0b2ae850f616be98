"""Decode attention that reads the cache where it lies, one block of positions at a time.

Decode attention is memory-bound: one query per (sequence, head) meets every cached key and
value once, so its speed is the speed at which the cache can be read. What used to slow it
down is everything around that read: converting the whole prefix to float32 copies (CPU
matmuls in half precision are slow or missing) or decompressing the whole prefix of a
compressed cache, every call, into freshly allocated tensors; that wrote and re-read several
times the cache's bytes and paid a page fault per 4 KiB of new memory.

Here the prefix is taken in blocks of positions. A block that is already in the compute dtype
is used in place (a strided view of the cache); any other block is converted, or dequantised
(:class:`~flexgen.attention.base.PackedKV`), into a workspace buffer that is reused for every
block and every call and is small enough to stay in the CPU's cache. Two passes:

1. scores: for each key block, ``q · kᵀ`` (a batched matrix-vector product) into a float32
   score row per (sequence, head); then the padding mask and the softmax over the whole row
   (the row is small: ``t`` floats);
2. output: for each value block, ``probs · v`` accumulated in float32.

Each cached byte is read once from memory, and only the block workspace and the score rows are
written. The result equals the unblocked computation up to float32 rounding (sums are split
at block boundaries). torch's intra-op threads (``torch.set_num_threads``) run every operation
on all cores.

Any layout works: blocks are slices along the position axis of the (B, H, t, D) views the
engine passes, and the workspace copies a block in the memory order of its source, so the copy
runs over long contiguous stretches. For the engine's (T, B, H, D) cache a block of positions
is one contiguous piece of memory (see :mod:`flexgen.attention.cpu` for the layout
measurements).
"""

from __future__ import annotations

import torch

from flexgen.attention.base import PackedKV
from flexgen.workspace import Workspace

KV = torch.Tensor | PackedKV


def kv_length(x: KV) -> int:
    """Positions in a (B, H, t, D) tensor or a :class:`PackedKV`."""
    return x.length if isinstance(x, PackedKV) else x.shape[2]


#: Fewest positions per block: below about eight, each (sequence, head)'s matrix-vector
#: product is too short for the BLAS batch routines, which then cost several times more per
#: element (measured with MKL at W3's shape: 3 positions per block ran 5x slower than 8).
MIN_BLOCK_TOKENS = 8


def block_tokens(batch: int, heads: int, head_dim: int, dtype: torch.dtype, block_bytes: int) -> int:
    """Positions per block: about ``block_bytes`` of keys in ``dtype``, at least :data:`MIN_BLOCK_TOKENS`."""
    per_token = batch * heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return max(MIN_BLOCK_TOKENS, block_bytes // per_token)


def _load(x: KV, start: int, stop: int, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """Positions [start, stop) of ``x`` as a (B, H, n, D) tensor in ``dtype`` (a view when possible)."""
    if isinstance(x, PackedKV):
        _, b, h, d = x.shape
        out = workspace.empty("block", (stop - start, b, h, d), dtype, x.device)
        return x.block(start, stop, out=out)
    block = x[:, :, start:stop]
    if block.dtype == dtype:
        return block
    converted = workspace.empty_like_layout("block", block, dtype)
    return converted.copy_(block)


def blocked_decode(
    q: torch.Tensor, k: KV, v: KV, valid: torch.Tensor | None, *,
    compute_dtype: torch.dtype, block_bytes: int, workspace: Workspace,
) -> torch.Tensor:
    """``softmax(q kᵀ, masked) v`` for one query per sequence, reading the cache in blocks.

    ``q`` (B, H, 1, D), already scaled; ``k`` and ``v`` (B, H, t, D) tensors (any strides,
    any floating dtype) or :class:`PackedKV`; ``valid`` (B, t) bool or None (no padding).
    Matrix products run in ``compute_dtype``; scores, softmax and the output sum in float32.
    Returns (B, H, 1, D) in ``q``'s dtype, a new tensor (never workspace memory).
    """
    b, h, n, d = q.shape
    if n != 1:
        raise ValueError(f"decode takes one query per sequence, got q of shape {tuple(q.shape)}")
    t = kv_length(k)
    device = q.device
    in_place = not isinstance(k, PackedKV) and not isinstance(v, PackedKV) and k.dtype == v.dtype == compute_dtype
    # A cache already in the compute dtype is read in place: one block, no workspace at all.
    step = t if in_place else block_tokens(b, h, d, compute_dtype, block_bytes)
    rows = b * h
    q3 = q.reshape(rows, 1, d).to(compute_dtype)

    scores = workspace.empty("scores", (rows, 1, t), torch.float32, device)
    for start in range(0, t, step):
        stop = min(t, start + step)
        keys = _load(k, start, stop, compute_dtype, workspace).flatten(0, 1)  # (rows, n, D)
        if compute_dtype == torch.float32 and stop - start == t:
            torch.bmm(q3, keys.transpose(1, 2), out=scores)
        else:
            # bmm into a strided slice of the score rows is slow; a small contiguous buffer is not.
            part = workspace.empty("block_scores", (rows, 1, stop - start), compute_dtype, device)
            torch.bmm(q3, keys.transpose(1, 2), out=part)
            scores[:, :, start:stop].copy_(part)
    if valid is not None:
        scores.view(b, h, t).masked_fill_(~valid[:, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(compute_dtype)

    acc = workspace.empty("acc", (rows, 1, d), torch.float32, device).zero_()
    for start in range(0, t, step):
        stop = min(t, start + step)
        values = _load(v, start, stop, compute_dtype, workspace).flatten(0, 1)  # (rows, n, D)
        if compute_dtype == torch.float32:
            acc.baddbmm_(probs[:, :, start:stop], values)
        else:
            acc.add_(torch.bmm(probs[:, :, start:stop], values))
    return acc.view(b, h, 1, d).to(q.dtype, copy=True)
