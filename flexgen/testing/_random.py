"""Fresh random inputs that can still be replayed.

Contracts draw new inputs on every run, so a plugin is not tuned to one fixed tensor; the seed
goes into every failure message, and ``FLEXGEN_TEST_SEED=<seed>`` replays a failing run.
"""

from __future__ import annotations

import os
import secrets

import torch

SEED_ENV = "FLEXGEN_TEST_SEED"


def fresh_generator() -> tuple[torch.Generator, int]:
    """A CPU generator with a new seed (or the one in ``FLEXGEN_TEST_SEED``), and that seed."""
    seed = int(os.environ.get(SEED_ENV) or secrets.randbits(31))
    return torch.Generator().manual_seed(seed), seed


def randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Standard-normal values drawn on the CPU (reproducible everywhere), then moved."""
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
