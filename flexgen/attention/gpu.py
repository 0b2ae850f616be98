"""Attention on the compute device with ``scaled_dot_product_attention``.

The cache is brought to the compute device (a view when it lives there already), so this is
the backend for a GPU-resident cache, and the only one needed when computing on the CPU.
"""

import torch
import torch.nn.functional as F

from flexgen.attention.base import AttentionBackend


class GPUAttention(AttentionBackend):
    """Fused attention where the model computes."""

    def device(self, compute_device: torch.device) -> torch.device:
        return compute_device

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=1.0)
