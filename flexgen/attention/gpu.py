"""Attention on the compute device with ``scaled_dot_product_attention``.

The cache is brought to the compute device (a view when it lives there already), so this is
the backend for a GPU-resident cache, and the only one needed when computing on the CPU.

Without padding (``valid`` None) no mask is passed, so ``scaled_dot_product_attention`` may
choose its fused (flash / memory-efficient) kernels. Computing on the CPU, decode over a
float32 cache runs on :mod:`flexgen.kernels.decode_attention` where it is built, which reads
the engine's position-major cache in memory order (1.6x faster than
``scaled_dot_product_attention`` at opt-350m's shape on the 2-core CI machine). A compressed
cache arrives still packed
(:class:`~flexgen.attention.base.PackedKV`) and is dequantised block by block inside the
attention (:mod:`flexgen.attention.blocked`), into a workspace reused across calls, instead
of into a full-precision copy of the whole prefix every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexgen.attention.base import AttentionBackend, PackedKV
from flexgen.attention.blocked import blocked_decode
from flexgen.kernels import decode_attention as cpu_decode
from flexgen.workspace import Workspace

#: Workspace per block of dequantised keys/values: on a GPU only memory bounds it, and larger
#: blocks mean fewer kernel launches; on the CPU (computing there) it should stay in cache.
_BLOCK_BYTES = {"cuda": 32 << 20, "cpu": 8 << 20}


class GPUAttention(AttentionBackend):
    """Fused attention where the model computes."""

    accepts_unmasked = True
    reads_packed_cache = True
    accepts_grouped_kv = True

    def __init__(self) -> None:
        super().__init__()
        self.workspace = Workspace()

    def device(self, compute_device: torch.device) -> torch.device:
        return compute_device

    def describe(self, device: torch.device, compute_dtype: torch.dtype) -> str | None:
        """Computing on the CPU in float32, whether decode runs on the native kernel there (it
        builds the kernel the first time); elsewhere, nothing to say."""
        return cpu_decode.describe() if device.type == "cpu" and compute_dtype == torch.float32 else None

    def decode(
        self, q: torch.Tensor, k: torch.Tensor | PackedKV, v: torch.Tensor | PackedKV, valid: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(k, PackedKV) or isinstance(v, PackedKV):
            # Blocks are dequantised straight to float32 (no rounding to the cache dtype), and
            # scores stay in float32 as in the fused kernels; the workspace bounds the cost.
            return blocked_decode(
                q, k, v, valid, compute_dtype=torch.float32,
                block_bytes=_BLOCK_BYTES.get(q.device.type, _BLOCK_BYTES["cuda"]), workspace=self.workspace,
            )
        if q.device.type == "cpu" and q.dtype == torch.float32 and cpu_decode.takes(q, k, v, valid):
            return cpu_decode.decode_attention(q, k, v, valid)
        mask = None if valid is None else valid[:, None, None, :]
        b, h, _, d = q.shape
        kv_heads = k.shape[1]
        if kv_heads == h:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        # Grouped-query attention: the group's queries of one KV head become that head's
        # "positions", (B, H_kv, G, D) - a view of q, so no KV head is repeated or copied.
        grouped = q.reshape(b, kv_heads, h // kv_heads, d)
        return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=1.0).reshape(b, h, 1, d)
