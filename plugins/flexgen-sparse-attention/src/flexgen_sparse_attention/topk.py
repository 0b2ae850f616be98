"""Top-k sparse attention in decode: FlexGen's attention-sparsity approximation.

During decode each new query attends to the whole cache, yet most of the softmax mass sits
on a few positions. Keeping only the ``k`` largest scores per head (``k = ceil(ratio *
valid positions)``, at least 1) and renormalising over them approximates dense attention
while reading only ``k`` rows of V. FlexGen reported good accuracy down to about 10 %.

Prefill stays dense (the inherited :meth:`AttentionBackend.prefill`): the approximation is
meant for the long decode phase, and a sparse prompt pass would change what goes into the
cache.

Exactness: when ``k`` covers every valid position of every sequence (``ratio: 1.0``, or a
short prefix) this backend calls the built-in ``gpu`` backend's decode, so greedy outputs
equal dense attention bit for bit in float32.
"""

from __future__ import annotations

import math

import torch

from flexgen.attention.base import AttentionBackend
from flexgen.attention.gpu import GPUAttention

_DEVICES = ("compute", "cpu")


class TopKAttention(AttentionBackend):
    """Decode attention over the ``ratio`` fraction of cache positions with the largest scores.

    Options (from the config mapping ``{name: topk, ...}``):

    - ``ratio`` (float in (0, 1], default 0.1): fraction of each sequence's valid cache
      positions kept per head; ``k = max(1, ceil(ratio * t_valid))``.
    - ``device`` (``compute`` | ``cpu``, default ``compute``): where decode runs. ``cpu``
      makes this a CPU-delegation backend: the engine leaves a host-resident cache in place
      and ships only the query and the output across PCIe.
    """

    def __init__(self, ratio: float = 0.1, device: str = "compute") -> None:
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise TypeError(f"ratio must be a number in (0, 1], got {ratio!r}")
        if device not in _DEVICES:
            raise TypeError(f"device must be one of {list(_DEVICES)}, got {device!r}")
        self.ratio = float(ratio)
        self.where = device
        self._dense = GPUAttention()  # what "k covers everything" computes, kernel for kernel

    def __repr__(self) -> str:
        return f"TopKAttention(ratio={self.ratio}, device={self.where!r})"

    def device(self, compute_device: torch.device) -> torch.device:
        return torch.device("cpu") if self.where == "cpu" else compute_device

    def keep_counts(self, valid: torch.Tensor) -> torch.Tensor:
        """Positions kept per sequence, (B,) int64: ``max(1, ceil(ratio * t_valid))``, at most t_valid.

        Computed in float64 on the host values so that e.g. ratio 0.1 of 30 positions is 3,
        not 4 through float32 rounding.
        """
        t_valid = valid.sum(dim=-1).to(torch.float64)
        k = torch.ceil(t_valid * self.ratio - 1e-9).to(torch.int64).clamp(min=1)
        return torch.minimum(k, t_valid.to(torch.int64).clamp(min=1))

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        out_dtype = q.dtype
        if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
            # Half-precision matmuls on CPUs are slow or missing; float32 is also more accurate.
            q, k, v = q.float(), k.float(), v.float()
        keep = self.keep_counts(valid)
        t_valid = valid.sum(dim=-1)
        if bool((keep >= t_valid).all()):
            # k covers everything: the built-in gpu backend's dense attention, the very same call
            # (on the CPU that is flexgen's decode-attention kernel where it is built).
            return self._dense.decode(q, k, v, valid).to(out_dtype)
        return self._sparse(q, k, v, valid, keep).to(out_dtype)

    @staticmethod
    def _sparse(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Softmax over the top ``keep[b]`` scores of each head, times the matching V rows."""
        # Scores in float32 on every device: rounded to half precision (a GPU's float16 or
        # bfloat16 matmul), near-equal scores at the cut-off would swap places, and which
        # positions are kept would depend on the device.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # (B, H, 1, t)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        k_max = int(keep.max())
        top, idx = scores.topk(k_max, dim=-1)  # (B, H, 1, k_max), sorted descending
        # Sequences that keep fewer than k_max positions drop the tail of their ranking.
        dropped = torch.arange(k_max, device=scores.device) >= keep.to(scores.device)[:, None, None, None]
        top = top.masked_fill(dropped, float("-inf"))
        # Their indices may point at padding; read the best row instead, so that whatever the
        # cache holds at padding (even NaN) never meets a zero weight.
        idx = torch.where(dropped, idx[..., :1], idx)
        probs = torch.softmax(top, dim=-1).to(v.dtype)  # (B, H, 1, k_max)
        rows = idx.squeeze(-2).unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])  # (B, H, k_max, D)
        return torch.matmul(probs, torch.gather(v, 2, rows))


def expected_keep(ratio: float, t_valid: int) -> int:
    """The documented keep count, in plain Python, for tests."""
    return min(t_valid, max(1, math.ceil(ratio * t_valid - 1e-9)))


def topk_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """The documented rule in float64, one (sequence, head) at a time, for tests (CPU inputs)."""
    b, h, _, d = q.shape
    out = torch.zeros(b, h, 1, d, dtype=torch.float64)
    for i in range(b):
        pos = valid[i].nonzero().flatten()
        keep = expected_keep(ratio, len(pos))
        for j in range(h):
            scores = k[i, j, pos].double() @ q[i, j, 0].double()
            top = scores.topk(keep).indices
            out[i, j, 0] = torch.softmax(scores[top], dim=0) @ v[i, j, pos[top]].double()
    return out
