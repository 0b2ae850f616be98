"""FlexGen's CPU delegation: decode attention on the host, next to a host-resident cache.

Moving one query per sequence to the host and the attention output back costs a few
kilobytes; moving the cache to the GPU would cost the whole cache every step. Computation is
in float32 (or the cache's dtype when that is float32/bfloat16 and ``dtype`` says so), since
half-precision matmuls on CPUs are slow or unsupported.
"""

import torch

from flexgen.attention.base import AttentionBackend

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CPUAttention(AttentionBackend):
    """Decode attention on the host CPU, on all its cores."""

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.compute_dtype = _DTYPES[dtype]

    def device(self, compute_device: torch.device) -> torch.device:
        return torch.device("cpu")

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))
        scores.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(dtype)
        return torch.matmul(probs, v.to(dtype)).to(q.dtype)
