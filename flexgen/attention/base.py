"""AttentionBackend: where and how attention over the KV cache is computed.

The engine computes the projections; the backend computes ``softmax(q kᵀ + mask) v``. During
decode the engine brings the cache to :meth:`AttentionBackend.device` (a view when the cache
already lives there), so a backend that runs on the host reads a host-resident cache in place
and the cache never crosses PCIe (FlexGen's "CPU delegation").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, n, n) mask: causal, padding keys hidden, each position sees itself.

    Letting a padding query see itself keeps its softmax finite, so no NaN reaches the cache.
    """
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


class AttentionBackend(ABC):
    """Computes attention for the prompt (prefill) and for one new token (decode).

    Shapes: ``q`` (B, H, n, D) already multiplied by ``1/sqrt(D)``; ``k`` and ``v``
    (B, H, t, D); ``valid`` (B, t) bool, False at padding positions. Outputs (B, H, n, D)
    on the device and in the dtype of ``q``.
    """

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown options {sorted(options)}")

    @abstractmethod
    def device(self, compute_device: torch.device) -> torch.device:
        """Where decode attention runs; the engine brings queries and cache here."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attention of one new query per sequence over the cache prefix (n == 1)."""

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Causal attention over the prompt; runs where the tensors are (the compute device)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prefill_mask(valid), scale=1.0)
