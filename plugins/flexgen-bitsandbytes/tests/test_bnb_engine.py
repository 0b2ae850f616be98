"""The bitsandbytes compressors inside the real engine, on a tiny random OPT saved by HF.

- Weights, in every tier: greedy tokens equal HF transformers' ``OPTForCausalLM`` run on the
  same weights passed through the plugin's quantize→dequantize (float32, CPU). That is the
  engine storing exactly what bitsandbytes produced and decompressing it exactly.
- KV cache, in every tier, with decode on the compute device or on the host: runs, and the
  first token (from the dense prefill, before any cache is read back) equals the
  uncompressed run; agreement with it is printed (``pytest -s``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)")
plugin = pytest.importorskip(
    "flexgen_bitsandbytes", reason="flexgen-bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)"
)
_CPU_PROBLEM = plugin.cpu_support()
pytestmark = pytest.mark.skipif(_CPU_PROBLEM is not None, reason=str(_CPU_PROBLEM))

try:
    from flexgen import Policy, load_engine
except ImportError as exc:
    pytest.skip(f"flexgen.engine cannot be imported ({exc})", allow_module_level=True)

from flexgen import registry  # noqa: E402
from flexgen.testing.reference import (  # noqa: E402
    TINY_CONFIG, agreement, hf_greedy, round_tripped, write_random_checkpoint,
)

PROMPTS = [[2, 15, 16, 17, 18, 19], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14], [2, 99], [2, 50, 51, 52, 53]]
NEW_TOKENS = 8
COMPRESSORS = ["bnb-nf4", "bnb-fp4", "bnb-int8"]
#: tier -> (gpu percent, cpu percent); disk is the rest
TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (30, 30)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random OPT saved with ``save_pretrained`` (head size 32)."""
    path = tmp_path_factory.mktemp("bnb-ckpt")
    return path, write_random_checkpoint(path, num_attention_heads=2, max_position_embeddings=64)


def quantized_copy(model: torch.nn.Module, spec) -> torch.nn.Module:
    """The HF model with every weight of ndim >= 2 (what the engine compresses) round-tripped."""
    return round_tripped(model, registry.create("compressor", spec))


def run(path: Path, offload: Path, plugins: dict, weights: str = "gpu", cache: str = "gpu"):
    policy = Policy(
        gpu_batch_size=2, num_gpu_batches=2,
        weights_gpu=TIERS[weights][0], weights_cpu=TIERS[weights][1],
        cache_gpu=TIERS[cache][0], cache_cpu=TIERS[cache][1],
    )
    with load_engine(path, policy=policy, plugins=plugins, device="cpu", dtype="float32", offload_dir=offload) as engine:
        out = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        return out, engine.stats.to_dict()["compression"]


@pytest.fixture(scope="module")
def uncompressed(checkpoint, tmp_path_factory) -> list[list[int]]:
    path, model = checkpoint
    out, _ = run(path, tmp_path_factory.mktemp("none"), {})
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS)
    return out


@pytest.fixture(scope="module", params=COMPRESSORS)
def quantized_reference(request, checkpoint) -> tuple[str, list[list[int]]]:
    _, model = checkpoint
    return request.param, hf_greedy(quantized_copy(model, request.param), PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("weights", list(TIERS))
def test_weights_equal_hf_on_bnb_quantized_weights(checkpoint, quantized_reference, weights, tmp_path):
    path, _ = checkpoint
    name, expected = quantized_reference
    if weights == "mix" and name != "bnb-nf4":
        pytest.skip("one compressor suffices for weights split over three tiers")
    out, stats = run(path, tmp_path, {"weight_compressor": name}, weights=weights)
    assert out == expected
    assert 0 < stats["weights_stored_bytes"] < stats["weights_raw_bytes"]


def test_weight_options_reach_bitsandbytes(checkpoint, tmp_path):
    path, model = checkpoint
    spec = {"name": "bnb-nf4", "blocksize": 128}
    out, _ = run(path, tmp_path, {"weight_compressor": spec}, weights="cpu")
    assert out == hf_greedy(quantized_copy(model, spec), PROMPTS, NEW_TOKENS)


#: (compressor, cache tier, attention): every compressor in every tier, decode on the compute
#: device and on the host (CPU delegation, which reads a host-side cache in place)
CACHE_CASES = [
    (name, cache, attention)
    for name in COMPRESSORS
    for cache, attention in [("gpu", "gpu"), ("cpu", "cpu"), ("disk", "cpu"), ("disk", "gpu")]
] + [("bnb-nf4", "mix", "gpu"), ("bnb-nf4", "cpu", "gpu")]


@pytest.mark.parametrize("name,cache,attention", CACHE_CASES)
def test_cache_runs_in_every_tier(checkpoint, uncompressed, name, cache, attention, tmp_path):
    path, _ = checkpoint
    out, stats = run(path, tmp_path, {"cache_compressor": name, "attention": attention}, cache=cache)
    assert [len(row) for row in out] == [NEW_TOKENS] * len(PROMPTS)
    assert all(0 <= t < TINY_CONFIG["vocab_size"] for row in out for t in row)
    assert [row[0] for row in out] == [row[0] for row in uncompressed]
    assert 0 < stats["cache_stored_bytes"] < stats["cache_raw_bytes"]
    print(f"\n{name} cache, tier {cache}, attention {attention}: agreement {agreement(out, uncompressed):.3f}, "
          f"stored/raw {stats['cache_stored_bytes'] / stats['cache_raw_bytes']:.3f}")


def test_cache_and_weights_together(checkpoint, uncompressed, tmp_path):
    path, _ = checkpoint
    out, stats = run(path, tmp_path, {"weight_compressor": "bnb-nf4", "cache_compressor": "bnb-fp4"},
                     weights="mix", cache="mix")
    assert [len(row) for row in out] == [NEW_TOKENS] * len(PROMPTS)
    assert stats["weights_stored_bytes"] < stats["weights_raw_bytes"] / 4
