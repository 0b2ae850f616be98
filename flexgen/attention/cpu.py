"""FlexGen's CPU delegation: decode attention on the host, next to a host-resident cache.

Moving one query per sequence to the host and the attention output back costs a few
kilobytes; moving the cache to the GPU would cost the whole cache every step. Matrix products
are in float32 (or in bfloat16 when ``dtype`` says so), since half-precision matmuls on many
CPUs are slow or unsupported.

Decode reads the cache where it lies. With float32 products (the default) over a plain
float32, float16 or bfloat16 cache, it runs on :mod:`flexgen.kernels.decode_attention` where
that is built (x86-64 Linux with AVX2, FMA and F16C, and a C compiler): the kernel widens
half-precision values to float32 in registers as it reads them, walking the engine's
position-major cache in memory order, so the cache is read once and nothing is copied. At W3's
shape (below) it reads a float16 cache at 14 GB/s on the 2-core development machine, 2.0x the
blocked path and faster than a plain copy of the same bytes (``python3
benchmarks/hot_loops.py --only attention``). Elsewhere (products in bfloat16, a compressed
cache, no kernel), decode goes block by block (:mod:`flexgen.attention.blocked`): a float16 or
bfloat16 cache is converted one block at a time into a workspace that this backend keeps
across calls (per thread, grown on demand, about ``block_kib`` KiB), and a compressed cache
(:class:`~flexgen.attention.base.PackedKV`) is dequantised into the same workspace, so
neither a float32 copy nor a decompressed copy of the whole prefix is ever made. Both use
torch's intra-op threads, i.e. every core unless ``torch.set_num_threads`` says otherwise.

Cache layout, measured with the blocked path (``python3 benchmarks/hot_loops.py --only
layouts``: W3's shape B=32, H=40, t=512, D=128, float16, on the 2-core development machine, a
loaded one, so best of 5 interleaved rounds): with blocks cut along the axis outermost in memory
(:func:`~flexgen.attention.blocked.plan_blocks`), decode reads the engine's (T, B, H, D)
cache as fast as a (B, H, T, D) one or faster (87-91 ms against 104-139 ms per call on one
thread, 62 ms against 68-78 ms on two, over three runs), while cutting against the layout
reads about 3x slower. Appending one
token per step writes one contiguous (B, H, D) row into (T, B, H, D) but B·H scattered rows of
D values into (B, H, T, D), 1.6-1.9x slower. And the cache compressors' contract (parts keep
the (token, batch, head) leading axes, so one token's parts are written in place) rests on
the token axis coming first. So the layout stays (T, B, H, D).
On a GPU the choice matters less: ``scaled_dot_product_attention`` reads each position's
D contiguous values (whole 32-byte sectors) whatever the stride between positions; that is
reasoned, not yet measured (no GPU was at hand).
"""

from __future__ import annotations

import torch

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.attention.blocked import blocked_decode
from flexgen.kernels import decode_attention as cpu_decode
from flexgen.workspace import Workspace

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CPUAttention(AttentionBackend):
    """Decode attention on the host CPU, on all its cores.

    Options:
        dtype: ``float32`` (default) or ``bfloat16``: the dtype of the matrix products.
        block_kib: where the blocked path runs, the workspace per block of converted or
            dequantised keys/values, in KiB (default 8192). A block should stay within the
            CPU's caches (the last level's share of this process), yet hold at least eight
            positions of every sequence.
    """

    accepts_unmasked = True
    reads_packed_cache = True
    accepts_grouped_kv = True  # blocked_decode stacks each KV head's group of queries

    def __init__(self, dtype: str = "float32", block_kib: int = 8192) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if isinstance(block_kib, bool) or not isinstance(block_kib, int) or block_kib < 1:
            raise TypeError(f"block_kib must be a positive int, got {block_kib!r}")
        self.compute_dtype = _DTYPES[dtype]
        self.block_bytes = block_kib << 10
        self.workspace = Workspace()

    def device(self, compute_device: torch.device) -> torch.device:
        return torch.device("cpu")

    def describe(self, device: torch.device, compute_dtype: torch.dtype) -> str | None:
        """With float32 products, whether decode runs on the native kernel here (it builds the
        kernel the first time)."""
        return cpu_decode.describe() if self.compute_dtype == torch.float32 else None

    def decode(
        self, q: torch.Tensor, k: torch.Tensor | PackedKV, v: torch.Tensor | PackedKV, valid: torch.Tensor | None
    ) -> torch.Tensor:
        if self.compute_dtype == torch.float32 and cpu_decode.takes(q, k, v, valid):
            return cpu_decode.decode_attention(q, k, v, valid)
        return blocked_decode(
            q, k, v, valid, compute_dtype=self.compute_dtype, block_bytes=self.block_bytes, workspace=self.workspace
        )
