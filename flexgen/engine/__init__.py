"""The engine: runs the zig-zag block schedule over weights, caches and activations in tiers.

Public: :func:`load_engine`, :class:`Engine` (``generate``, ``stats``, ``close``),
:class:`EngineStats`. The engine is a few rooms, one concern each, that meet in the step loop:

=================  ==================================================================
``loop.py``        :class:`Engine`: blocks, steps, tasks in the scheduler's order; the
                   one place where the rooms meet, read top to bottom
``placement.py``   where each weight lives; converting to disk; loading a layer
``transfers.py``   I/O threads, CUDA streams and events, bytes counted per link
``kv_cache.py``    the KV cache's units: allocation, layout, reads and writes
``attend.py``      where a decode attention runs: in place, prefetched, on the host
``sampling.py``    the next token (HF logits processors), per-prompt random streams
``block.py``       a block's state between tasks (GPU batches, pending host attention)
``stats.py``       :class:`EngineStats`: time, tokens, bytes per link, peak memory
``sizes.py``       tensor sizes; handing freed memory back to the OS
=================  ==================================================================

The engine talks to storage, compression, attention and the model only through their
interfaces; it knows which tier holds what, and when to move it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flexgen.dtypes import DTYPE_CHOICES, resolve_dtype
from flexgen.engine.loop import DEFAULT_PLUGINS, DTYPES, Engine, resolve_device
from flexgen.engine.stats import LINKS, EngineStats
from flexgen.errors import FlexGenError, PolicyError
from flexgen.linear import onednn_enabled
from flexgen.models.checkpoint import open_source
from flexgen.paths import cache_root
from flexgen.policy import Policy
from flexgen.threads import parse_threads

__all__ = ["DEFAULT_PLUGINS", "DTYPES", "LINKS", "Engine", "EngineStats", "default_offload_dir", "load_engine",
           "resolve_device"]

def default_offload_dir() -> Path:
    """Where disk-tier tensors live unless the user says otherwise."""
    return cache_root() / "offload"


def load_engine(
    model: str | Path,
    policy: Policy | None = None,
    plugins: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    offload_dir: str | Path | None = None,
    dtype: str = "auto",
    seed: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
    threads: int | str | None = None,
) -> Engine:
    """Build an engine for an HF checkpoint directory of any registered family (OPT, Llama, Mistral, Qwen2,
    or a plugin family), or a synthetic size name of any family (``opt-1.3b``, ``llama-3.1-8b``).

    ``dtype``: the model's dtype; ``auto`` is float16 on CUDA, bfloat16 on a CPU with native
    bfloat16 matrix instructions, float32 on other CPUs (:mod:`flexgen.dtypes`, which also says
    when half precision is computed in float32). ``threads``: intra-op threads to compute with;
    None or ``"auto"`` lets the engine decide (:mod:`flexgen.threads`), a positive integer fixes it.
    ``progress(layers placed, layers, tensors converted to the offload folder)`` follows the
    placement of the weights (see :class:`Engine`).
    """
    if dtype not in DTYPE_CHOICES:
        raise FlexGenError(f"model.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if policy is None:
        policy = Policy()
    if not isinstance(policy, Policy):
        raise PolicyError(f"policy must be a flexgen.Policy, got {type(policy).__name__}")
    torch_dtype = DTYPES[dtype]
    source = open_source(model, dtype=torch_dtype, seed=seed)
    folder = Path(offload_dir) if offload_dir is not None else default_offload_dir()
    setting = parse_threads(threads, "threads")
    if device.type == "cpu":
        onednn_enabled()  # a bad FLEXGEN_CPU_LINEAR is named now, not at the first large product
    return Engine(source, policy, dict(plugins or {}), device, folder, torch_dtype, progress, threads=setting)
