"""What the engine did: time per phase, tokens, bytes per link, peak bytes per tier.

One object per engine, filled by every room: placement counts what compression saved,
transfers count the bytes each copy moves over each link, the loop counts time and tokens.
Several threads fill it at once (placement's pool, the I/O threads), so additions go under
its lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from flexgen.policy import TIERS

#: The links a copy can cross: a disk read into host memory, host to device, device to host,
#: and a write to disk. A copy from disk to the GPU crosses the first two.
LINKS = ("disk->cpu", "cpu->gpu", "gpu->cpu", "cpu->disk")


@dataclass
class EngineStats:
    """What the engine did: time per phase, tokens, bytes per link, peak bytes per tier."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    bytes_moved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINKS, 0))
    peak_memory: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    compression: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("weights_raw_bytes", "weights_stored_bytes", "cache_raw_bytes", "cache_stored_bytes"), 0
        )
    )
    #: the intra-op thread setting of the last step (:meth:`flexgen.threads.ThreadChoice.to_dict`)
    threads: dict[str, Any] | None = None
    #: the model's dtype and the one its products run in (they differ for half precision on a
    #: CPU without native instructions for it; see flexgen/dtypes.py)
    dtype: str | None = None
    compute_dtype: str | None = None
    #: which kernels compute float32 products on the CPU (:func:`flexgen.linear.describe`); None
    #: where the products run elsewhere or in another dtype
    cpu_products: str | None = None
    #: how decode attention is computed, in the backend's words (``AttentionBackend.describe``):
    #: for the built-in ones on the CPU, whether flexgen's kernel runs it; None for nothing to say
    attention_kernel: str | None = None
    #: held while a counter is added to from a thread other than the loop's
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total_time_s(self) -> float:
        return self.prefill_time_s + self.decode_time_s

    def _rate(self, tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    def count(self, link: str, nbytes: int) -> None:
        """Add ``nbytes`` to what crossed ``link`` (from any thread)."""
        with self.lock:
            self.bytes_moved[link] += nbytes

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the metrics JSON. Throughput is FlexGen's: new tokens / (prefill + decode)."""
        return {
            "prefill_time_s": self.prefill_time_s,
            "decode_time_s": self.decode_time_s,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_throughput": self._rate(self.prompt_tokens, self.prefill_time_s),
            "decode_throughput": self._rate(self.generated_tokens, self.decode_time_s),
            "total_throughput": self._rate(self.generated_tokens, self.total_time_s),
            "bytes_moved": dict(self.bytes_moved),
            "peak_memory": dict(self.peak_memory),
            "compression": dict(self.compression),
            "threads": dict(self.threads) if self.threads else None,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "cpu_products": self.cpu_products,
            "attention_kernel": self.attention_kernel,
        }

    def reset(self) -> None:
        """Zero the counters of time, tokens and traffic (placement figures stay)."""
        self.prefill_time_s = self.decode_time_s = 0.0
        self.prompt_tokens = self.generated_tokens = 0
        self.bytes_moved = dict.fromkeys(LINKS, 0)
