"""The top-k backend inside the real engine, on a tiny random OPT written by HF transformers.

- ``ratio: 1.0`` gives exactly the greedy tokens of dense attention (the built-in ``gpu``
  backend with the cache in the gpu tier, itself checked against HF here) in float32, for a
  cache in every tier and with decode on either device.
- A sparse ratio runs for a cache in every tier and gives the same tokens whichever tier holds
  the cache; its agreement with dense attention is printed (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "flexgen_sparse_attention",
    reason="flexgen-sparse-attention is not installed (pip install ./plugins/flexgen-sparse-attention)",
)
try:
    from flexgen import Policy, load_engine
except ImportError as exc:
    pytest.skip(f"flexgen.engine cannot be imported ({exc})", allow_module_level=True)

from flexgen.testing.reference import TINY_CONFIG, agreement, hf_greedy, write_random_checkpoint  # noqa: E402

PROMPTS = [[2, 15, 16, 17, 18, 19, 20, 21], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14, 30, 31], [2, 99], [2, 5, 6]]
NEW_TOKENS = 12
#: cache tier -> (cache_gpu, cache_cpu); disk is the rest
CACHE_TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (40, 30)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random OPT saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("topk-ckpt")
    return path, write_random_checkpoint(path)


def run(path: Path, offload: Path, cache: str, attention) -> list[list[int]]:
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu=CACHE_TIERS[cache][0], cache_cpu=CACHE_TIERS[cache][1])
    with load_engine(path, policy=policy, plugins={"attention": attention}, device="cpu", dtype="float32",
                     offload_dir=offload) as engine:
        return engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def dense(checkpoint, tmp_path_factory) -> list[list[int]]:
    path, model = checkpoint
    out = run(path, tmp_path_factory.mktemp("dense"), "gpu", "gpu")
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS)  # the dense baseline is HF's
    return out


#: (cache tier, where decode runs): every tier, and host decode for the host-side tiers
PLACES = [("gpu", "compute"), ("gpu", "cpu"), ("cpu", "compute"), ("cpu", "cpu"), ("disk", "compute"),
          ("disk", "cpu"), ("mix", "compute")]


@pytest.mark.parametrize("cache,device", PLACES)
def test_ratio_one_equals_dense_exactly(checkpoint, dense, cache, device, tmp_path):
    path, _ = checkpoint
    assert run(path, tmp_path, cache, {"name": "topk", "ratio": 1.0, "device": device}) == dense


@pytest.fixture(scope="module")
def sparse_gpu_tier(checkpoint, tmp_path_factory) -> list[list[int]]:
    path, _ = checkpoint
    return run(path, tmp_path_factory.mktemp("sparse"), "gpu", {"name": "topk", "ratio": 0.1})


@pytest.mark.parametrize("cache,device", [("cpu", "cpu"), ("disk", "compute"), ("disk", "cpu"), ("mix", "compute")])
def test_sparse_runs_in_every_tier(checkpoint, dense, sparse_gpu_tier, cache, device, tmp_path):
    path, _ = checkpoint
    out = run(path, tmp_path, cache, {"name": "topk", "ratio": 0.1, "device": device})
    assert [len(row) for row in out] == [NEW_TOKENS] * len(PROMPTS)
    assert all(0 <= t < TINY_CONFIG["vocab_size"] for row in out for t in row)
    assert out == sparse_gpu_tier  # where the cache lives does not change the arithmetic
    assert [row[0] for row in out] == [row[0] for row in dense]  # the prefill stays dense
    print(f"\ntopk 0.1, cache {cache}, device {device}: agreement with dense {agreement(out, dense):.3f}")


def test_sparse_changes_outputs(checkpoint, dense, sparse_gpu_tier):
    """At 10 % of a 20-token cache (1-3 positions per head) the approximation shows."""
    assert sparse_gpu_tier != dense
