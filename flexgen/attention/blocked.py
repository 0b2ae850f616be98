"""Decode attention that reads the cache where it lies, one block at a time.

Decode attention is memory-bound: one query per (sequence, head) meets every cached key and
value once, so its speed is the speed at which the cache can be read. What used to slow it
down is everything around that read: converting the whole prefix to float32 copies (CPU
matmuls in half precision are slow or missing) or decompressing the whole prefix of a
compressed cache, every call, into freshly allocated tensors; that wrote and re-read several
times the cache's bytes and paid a page fault per 4 KiB of new memory.

Here the prefix is taken in blocks. A cache already in the compute dtype is used in place (a
strided view, one block); any other block is converted, or dequantised
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

Any layout works, and fast: :func:`plan_blocks` cuts blocks along whichever axis of the
(B, H, t, D) view is outermost in memory (positions for the engine's (T, B, H, D) cache,
sequences for a (B, H, T, D) one), and the workspace copies a block in its source's memory
order, so every copy streams over long contiguous runs. Measured at W3's shape, the two layouts
then read about equally fast; cutting against the layout reads about 3x slower (see
:mod:`flexgen.attention.cpu` for the figures and the layout decision).
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

Block = tuple[slice, slice]  # (sequences, positions)


def block_tokens(batch: int, heads: int, head_dim: int, dtype: torch.dtype, block_bytes: int) -> int:
    """Positions per block: about ``block_bytes`` of keys in ``dtype``, at least :data:`MIN_BLOCK_TOKENS`."""
    per_token = batch * heads * head_dim * _itemsize(dtype)
    return max(MIN_BLOCK_TOKENS, block_bytes // per_token)


def plan_blocks(x: KV, dtype: torch.dtype, block_bytes: int) -> list[Block]:
    """Blocks of (sequences, positions) covering ``x``, each about ``block_bytes`` in ``dtype``.

    Blocks are cut along the axis outermost in memory, so that each is a few long contiguous
    runs: all sequences and a range of positions for a position-major cache (the engine's
    (T, B, H, D), and every :class:`PackedKV`), all positions and a range of sequences for a
    sequence-major one ((B, H, T, D)); a sequence too long for one block is cut in positions
    too. Copying a block then streams, whatever the layout.
    """
    b, h, t, d = (x.shape[1], x.shape[2], x.shape[0], x.shape[3]) if isinstance(x, PackedKV) else tuple(x.shape)
    if isinstance(x, PackedKV) or x.stride(2) >= x.stride(0):
        step_b, step_t = b, block_tokens(b, h, d, dtype, block_bytes)
    else:
        per_batch = h * t * d * _itemsize(dtype)
        step_b = max(1, min(b, block_bytes // per_batch))
        step_t = t if per_batch <= block_bytes else block_tokens(1, h, d, dtype, block_bytes)
    return [
        (slice(b0, min(b, b0 + step_b)), slice(t0, min(t, t0 + step_t)))
        for b0 in range(0, b, step_b)
        for t0 in range(0, t, step_t)
    ]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _load(x: KV, block: Block, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """One block of ``x`` as a (b, H, n, D) tensor in ``dtype`` (a view of ``x`` when possible)."""
    batches, positions = block
    if isinstance(x, PackedKV):  # its blocks always hold every sequence
        _, b, h, d = x.shape
        out = workspace.empty("block", (positions.stop - positions.start, b, h, d), dtype, x.device)
        return x.block(positions.start, positions.stop, out=out)
    part = x[batches, :, positions]
    if part.dtype == dtype:
        return part
    converted = workspace.empty_like_layout("block", part, dtype)
    return converted.copy_(part)


def blocked_decode(
    q: torch.Tensor, k: KV, v: KV, valid: torch.Tensor | None, *,
    compute_dtype: torch.dtype, block_bytes: int, workspace: Workspace,
) -> torch.Tensor:
    """``softmax(q kᵀ, masked) v`` for one query per sequence, reading the cache in blocks.

    ``q`` (B, H, 1, D), already scaled; ``k`` and ``v`` (B, H_kv, t, D) tensors (any strides,
    any floating dtype) or :class:`PackedKV`, with H_kv dividing H (grouped-query attention when
    fewer: the G = H / H_kv queries of one KV head are stacked, so each cached byte is still read
    once, never repeated per query head); ``valid`` (B, t) bool or None (no padding).
    Matrix products run in ``compute_dtype``; scores, softmax and the output sum in float32.
    Returns (B, H, 1, D) in ``q``'s dtype, a new tensor (never workspace memory).
    """
    b, h, n, d = q.shape
    if n != 1:
        raise ValueError(f"decode takes one query per sequence, got q of shape {tuple(q.shape)}")
    t = kv_length(k)
    kv_heads = k.shape[2] if isinstance(k, PackedKV) else k.shape[1]
    if h % kv_heads:
        raise ValueError(f"decode: {h} query heads are not a multiple of {kv_heads} key/value heads")
    g = h // kv_heads
    device = q.device
    q3 = q.reshape(b * kv_heads, g, d).to(compute_dtype)

    def blocks(x: KV) -> list[Block]:
        if not isinstance(x, PackedKV) and x.dtype == compute_dtype:
            return [(slice(0, b), slice(0, t))]  # read in place: one block, no workspace at all
        return plan_blocks(x, compute_dtype, block_bytes)

    scores = workspace.empty("scores", (b * kv_heads, g, t), torch.float32, device)
    for block in blocks(k):
        rows = slice(block[0].start * kv_heads, block[0].stop * kv_heads)
        keys = _load(k, block, compute_dtype, workspace).flatten(0, 1)  # (rows, n, D)
        target = scores[rows, :, block[1]]
        if compute_dtype == torch.float32 and target.is_contiguous():
            torch.bmm(q3[rows], keys.transpose(1, 2), out=target)
        else:
            # bmm into a strided slice of the score rows is slow; a small contiguous buffer is not.
            part = workspace.empty("block_scores", tuple(target.shape), compute_dtype, device)
            torch.bmm(q3[rows], keys.transpose(1, 2), out=part)
            target.copy_(part)
    if valid is not None:
        scores.view(b, kv_heads * g, t).masked_fill_(~valid[:, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(compute_dtype)

    acc = workspace.empty("acc", (b * kv_heads, g, d), torch.float32, device).zero_()
    for block in blocks(v):
        rows = slice(block[0].start * kv_heads, block[0].stop * kv_heads)
        values = _load(v, block, compute_dtype, workspace).flatten(0, 1)  # (rows, n, D)
        weights = probs[rows, :, block[1]]
        if compute_dtype == torch.float32:
            acc[rows].baddbmm_(weights, values)
        else:
            acc[rows].add_(torch.bmm(weights, values))
    return acc.view(b, h, 1, d).to(q.dtype, copy=True)
