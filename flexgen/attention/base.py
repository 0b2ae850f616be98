"""AttentionBackend: where and how attention over the KV cache is computed.

The engine computes the projections; the backend computes ``softmax(q kᵀ + mask) v``. During
decode the engine brings the cache to :meth:`AttentionBackend.device` (a view when the cache
already lives there), so a backend that runs on the host reads a host-resident cache in place
and the cache never crosses PCIe (FlexGen's "CPU delegation").

Two opt-in class attributes let a backend receive the cache in a cheaper form:

- ``accepts_unmasked``: ``valid`` may be None, meaning no position is padding, so the backend
  can skip the mask (and on a GPU let ``scaled_dot_product_attention`` pick its fused kernels).
- ``reads_packed_cache``: with a compressed cache, decode receives ``k`` and ``v`` as
  :class:`PackedKV`, still compressed, and dequantises them block by block inside the
  attention, instead of the engine decompressing the whole prefix into a full-precision
  tensor every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from flexgen.compression.base import Compressor


@dataclass(frozen=True)
class PackedKV:
    """Keys or values of one cache unit, still compressed: positions [0, length).

    ``parts`` are the cache compressor's parts as the cache holds them, each (T, B, H, ...)
    with the (token, batch, head) leading axes every cache compressor keeps, already sliced to
    ``[:length]`` and on the attention device. ``shape`` is (length, B, H, D), the shape of the
    decompressed slice; ``dtype`` what decompression yields (the cache's dtype).

    Attention reads it in blocks of positions through :meth:`block`, so no full-precision copy
    of the whole prefix ever exists: the bytes touched per step are the compressed bytes plus
    one block of workspace.
    """

    parts: Mapping[str, torch.Tensor]
    compressor: Compressor
    shape: tuple[int, int, int, int]
    dtype: torch.dtype

    @property
    def length(self) -> int:
        """Cached positions."""
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    def block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Positions [start, stop) decompressed, as a (B, H, stop - start, D) view.

        ``out``, when given, is a (stop - start, B, H, D) buffer of any floating dtype (a
        workspace the caller reuses); the block is decompressed straight into it, in its dtype.
        Without it a new tensor of :attr:`dtype` is returned.
        """
        _, b, h, d = self.shape
        shape = (stop - start, b, h, d)
        parts = {name: part[start:stop] for name, part in self.parts.items()}
        if out is None:
            out = self.compressor.decompress(parts, shape, self.dtype)
        else:
            if tuple(out.shape) != shape:
                raise ValueError(f"PackedKV.block: out is {tuple(out.shape)}, expected {shape}")
            self.compressor.decompress_into(parts, out, self.dtype)
        return out.permute(1, 2, 0, 3)

    def decompress(self) -> torch.Tensor:
        """The whole prefix as a (B, H, length, D) tensor: the reference a packed read must equal."""
        return self.block(0, self.length)


def prefill_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, n, n) mask: causal, padding keys hidden, each position sees itself.

    Letting a padding query see itself keeps its softmax finite, so no NaN reaches the cache.
    With a sliding ``window``, query i sees keys j with ``i - window < j <= i`` only (Mistral's
    rule; slots and positions differ by a row's left padding only, so the band is the same).
    """
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(n, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]


class AttentionBackend(ABC):
    """Computes attention for the prompt (prefill) and for one new token (decode).

    Shapes: ``q`` (B, H, n, D) already multiplied by ``1/sqrt(D)``; ``k`` and ``v``
    (B, H, t, D), possibly strided views of the cache (never write to them); ``valid`` (B, t)
    bool, False at padding positions. Outputs (B, H, n, D) on the device and in the dtype of
    ``q``.

    Class attributes (the engine reads them; all default to False):
        accepts_unmasked: ``valid`` may be None, meaning every position is valid.
        reads_packed_cache: with a compressed cache, ``decode`` receives ``k`` and ``v`` as
            :class:`PackedKV` (still compressed) instead of decompressed tensors.
        accepts_grouped_kv: ``k`` and ``v`` may have fewer heads (H_kv, dividing H) than ``q``
            (grouped-query attention: query head h reads KV head ``h // (H / H_kv)``). Without
            it the engine repeats each KV head for its group, a copy of the cache read.
    """

    accepts_unmasked: ClassVar[bool] = False
    reads_packed_cache: ClassVar[bool] = False
    accepts_grouped_kv: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown options {sorted(options)}")

    @abstractmethod
    def device(self, compute_device: torch.device) -> torch.device:
        """Where decode attention runs; the engine brings queries and cache here."""

    def describe(self, device: torch.device, compute_dtype: torch.dtype) -> str | None:
        """One line for the run summary on how decode attention is computed on ``device`` (what
        :meth:`device` returned), with the model's products in ``compute_dtype``; or None (the
        default) for nothing to say. The engine asks once, when it is made, and that is when a
        backend may build what it needs."""
        return None

    @abstractmethod
    def decode(
        self, q: torch.Tensor, k: torch.Tensor | PackedKV, v: torch.Tensor | PackedKV, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of one new query per sequence over the cache prefix (n == 1).

        ``k`` and ``v`` are :class:`PackedKV` only for a backend with ``reads_packed_cache``,
        ``valid`` is None only for one with ``accepts_unmasked``.
        """

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                window: int | None = None) -> torch.Tensor:
        """Causal attention over the prompt; runs where the tensors are (the compute device).

        Without padding (``valid`` None) the causal mask is implicit, so fused kernels apply.
        ``window``: a sliding window (see :func:`prefill_mask`); the engine passes it, with a
        ``valid`` mask, only when it is shorter than the prompt, so a backend that overrides
        this method without it still runs every model without one. ``k``, ``v`` may have fewer
        heads than ``q`` (grouped-query attention): SDPA groups them itself.
        """
        gqa = k.shape[1] != q.shape[1]
        if valid is None and window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=gqa)
        if valid is None:
            valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prefill_mask(valid, window), scale=1.0,
                                              enable_gqa=gqa)
