"""Compression inside the engine: weights equal HF on quantized weights, caches run everywhere.

- Compressed weights are lossy, but deterministically so: HF transformers' ``OPTForCausalLM``
  run on the same weights passed through quantize→dequantize must give the same greedy tokens
  (float32, CPU), whichever tier holds the compressed weights.
- A compressed KV cache changes what attention sees, so its outputs are only compared with the
  uncompressed run as a printed agreement figure (``pytest -s`` shows it); the first token comes
  from the prefill, which attends over fresh (uncompressed) keys and values, so it must match.
- Compressed CPU-tier weights must occupy about their compressed size in host memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

try:
    from flexgen import Policy
    from flexgen.engine import load_engine
except ImportError as exc:  # the engine lands separately; say why these tests do not run
    pytest.skip(f"flexgen.engine cannot be imported ({exc})", allow_module_level=True)

from flexgen import registry
from flexgen.testing.reference import TINY_CONFIG, agreement, hf_greedy, round_tripped, write_random_checkpoint

PROMPTS = [[2, 15, 16, 17, 18, 19], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14], [2, 99], [2, 50, 51, 52, 53]]
NEW_TOKENS = 8

#: weight tier -> (weights_gpu, weights_cpu); disk is the rest
WEIGHT_TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (30, 30)}
#: cache tier -> (cache_gpu, cache_cpu)
CACHE_TIERS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random OPT written by HF's ``save_pretrained``, and the HF model itself."""
    path = tmp_path_factory.mktemp("ckpt-compression")
    return path, write_random_checkpoint(path, max_position_embeddings=64)


def quantized_copy(model: torch.nn.Module, compressor_spec) -> torch.nn.Module:
    """The HF model with exactly the tensors the engine compresses round-tripped."""
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight, "expected tied lm_head"
    return round_tripped(model, registry.create("compressor", compressor_spec))


def policy(weights: str = "gpu", cache: str = "gpu") -> Policy:
    return Policy(
        gpu_batch_size=2, num_gpu_batches=2,
        weights_gpu=WEIGHT_TIERS[weights][0], weights_cpu=WEIGHT_TIERS[weights][1],
        cache_gpu=CACHE_TIERS[cache][0], cache_cpu=CACHE_TIERS[cache][1],
    )


def run(path: Path, offload: Path, pol: Policy, plugins: dict, prompts=PROMPTS) -> list[list[int]]:
    with load_engine(path, policy=pol, plugins=plugins, device="cpu", dtype="float32", offload_dir=offload) as engine:
        return engine.generate(prompts, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def uncompressed(checkpoint, tmp_path_factory) -> list[list[int]]:
    path, model = checkpoint
    out = run(path, tmp_path_factory.mktemp("offload-none"), policy(), {})
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS)  # the baseline itself is HF's
    return out


# ------------------------------------------------------------------ compressed weights


@pytest.fixture(scope="module")
def quantized_reference(checkpoint):
    """HF greedy tokens on quantize→dequantize weights, per compressor spec (computed once)."""
    _, model = checkpoint
    found: dict[str, list[list[int]]] = {}

    def reference(spec) -> list[list[int]]:
        key = repr(spec)
        if key not in found:
            found[key] = hf_greedy(quantized_copy(model, spec), PROMPTS, NEW_TOKENS)
        return found[key]

    return reference


# every weight tier for both formats; the mixed placement once
WEIGHT_RUNS = [(name, tier) for name in ("int4", "int8") for tier in ("gpu", "cpu", "disk")] + [("int4", "mix")]


@pytest.mark.parametrize("name,weights", WEIGHT_RUNS)
def test_compressed_weights_equal_hf_on_quantized_weights(checkpoint, quantized_reference, name, weights, tmp_path):
    path, _ = checkpoint
    out = run(path, tmp_path, policy(weights=weights), {"weight_compressor": name})
    assert out == quantized_reference(name)


@pytest.mark.parametrize("scheduler", ["zigzag", "row"])
def test_unpack_buffers_survive_host_attention_on_its_worker(checkpoint, quantized_reference, scheduler, tmp_path):
    """Compressed weights are unpacked into buffers reused per weight name (on the CPU); a host
    attention finished later (its output projection) must still find its layer's weights intact."""
    path, _ = checkpoint
    pol = policy(weights="cpu", cache="cpu")
    with load_engine(path, policy=pol, plugins={"weight_compressor": "int4", "attention": "cpu", "scheduler": scheduler},
                     device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        engine.host_attention_on_worker = True
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == quantized_reference("int4")
        # one buffer per weight name, shared by every layer (with several GPU batches compressed
        # matrices are unpacked whole; the output embedding is multiplied by blocks of rows and
        # embedding tables have their rows gathered, so neither has one)
        assert pol.num_gpu_batches > 1
        names = {p.spec.local for layer in engine.layers for p in layer if p.compressed} - set(engine.placement.gathered)
        assert set(engine.placement.unpack_buffers) == names - {"lm_head.weight"}


def test_compressed_weights_are_reused_from_disk(checkpoint, quantized_reference, tmp_path):
    """A second engine on the same offload dir reads the converted parts; same tokens."""
    path, _ = checkpoint
    expected = quantized_reference("int4")
    first = run(path, tmp_path, policy(weights="disk"), {"weight_compressor": "int4"})
    files = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")}
    assert any(f.name.endswith(".scale.safetensors") for f in files), "no compressed parts on disk"
    second = run(path, tmp_path, policy(weights="disk"), {"weight_compressor": "int4"})
    assert first == second == expected
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.safetensors")} == files, "parts were rewritten"


def test_weight_compressor_options_reach_the_engine(checkpoint, quantized_reference, tmp_path):
    """``{name: int4, group_size: 32}`` is a different format from the default group of 64."""
    path, _ = checkpoint
    stored = {}
    for spec in ({"name": "int4", "group_size": 32}, "int4"):
        with load_engine(path, policy=policy(weights="cpu"), plugins={"weight_compressor": spec}, device="cpu",
                         dtype="float32", offload_dir=tmp_path) as engine:
            assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == quantized_reference(spec)
            stored[repr(spec)] = engine.stats.compression["weights_stored_bytes"]
    # twice the groups: 4 more bytes of scale and min per 64 values
    assert stored[repr({"name": "int4", "group_size": 32})] > stored[repr("int4")]


# ------------------------------------------------------------------ compressed cache


CACHE_RUNS = [("int4", cache, attention) for cache in CACHE_TIERS for attention in ("gpu", "cpu")]
CACHE_RUNS.append(("int8", "cpu", "cpu"))


@pytest.mark.parametrize("compressor,cache,attention", CACHE_RUNS)
def test_compressed_cache_runs_in_every_tier(checkpoint, uncompressed, compressor, cache, attention, tmp_path):
    path, _ = checkpoint
    out = run(path, tmp_path, policy(cache=cache), {"cache_compressor": compressor, "attention": attention})
    assert [len(row) for row in out] == [NEW_TOKENS] * len(PROMPTS)
    assert all(0 <= t < TINY_CONFIG["vocab_size"] for row in out for t in row)
    # The prefill attends over fresh keys and values, so the first token cannot differ.
    assert [row[0] for row in out] == [row[0] for row in uncompressed]
    print(f"\n{compressor} cache, tier {cache}, attention {attention}: "
          f"agreement with uncompressed {agreement(out, uncompressed):.3f}")


def test_compressed_cache_stats(checkpoint, tmp_path):
    path, _ = checkpoint
    with load_engine(path, policy=policy(cache="cpu"), plugins={"cache_compressor": "int4"}, device="cpu",
                     dtype="float32", offload_dir=tmp_path) as engine:
        engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        stats = engine.stats.to_dict()["compression"]
    ratio = stats["cache_stored_bytes"] / stats["cache_raw_bytes"]
    # head_dim 16 < group 64: one group per (token, head): 8 bytes of codes + 4 of scale/min
    # for 64 bytes of float32.
    assert ratio == pytest.approx(12 / 64)
    print(f"\nint4 cache stored/raw = {ratio:.3f}")


# ------------------------------------------------------------------ resident memory


@pytest.mark.parametrize("compressor", ["int4", "int8"])
def test_cpu_tier_weights_occupy_their_compressed_size(checkpoint, compressor, tmp_path):
    """Host memory of CPU-tier weights is within 10 % of what the compressor says they take."""
    from flexgen.models import opt

    path, _ = checkpoint
    c = registry.create("compressor", compressor)
    with load_engine(path, policy=policy(weights="cpu"), plugins={"weight_compressor": compressor},
                     device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        expected = raw = 0
        for index in range(engine.spec.num_model_layers):
            for weight in opt.layer_weights(engine.spec, index):
                size = 4 * torch.Size(weight.shape).numel()
                raw += size
                expected += c.nbytes(weight.shape, torch.float32) if len(weight.shape) >= 2 else size
        held = engine.storage["cpu"].nbytes()
        # Count real allocations of the compressed parts too: a part that were a view of a
        # larger buffer would keep the whole buffer alive while nbytes() reports only the view.
        storages, compressed_expected = {}, 0
        for layer in engine.layers:
            for placed in layer:
                assert placed.tier == "cpu"
                if placed.compressed:
                    compressed_expected += c.nbytes(placed.spec.shape, torch.float32)
                    for part in placed.parts.values():
                        storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
        allocated = sum(storages.values())
        stats = engine.stats.to_dict()["compression"]
    print(f"\n{compressor} weights on cpu: expected {expected} B, backend holds {held} B "
          f"(raw {raw} B); compressed parts: {compressed_expected} B expected, {allocated} B allocated")
    assert abs(held - expected) <= 0.1 * expected
    assert abs(allocated - compressed_expected) <= 0.1 * compressed_expected
    assert stats["weights_stored_bytes"] == pytest.approx(expected, rel=0.1)
    assert stats["weights_raw_bytes"] == raw


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weights", ["gpu", "cpu", "disk"])
def test_compressed_weights_on_cuda(checkpoint, quantized_reference, uncompressed, weights, tmp_path):
    """Decompression on the GPU gives the weights the CPU gives, so float32 tokens match HF's.

    A compressed int4 cache rides along, and its agreement with the uncompressed run is printed.
    """
    path, _ = checkpoint
    pol = policy(weights=weights, cache="cpu")
    with load_engine(path, policy=pol, plugins={"weight_compressor": "int4"}, device="cuda",
                     dtype="float32", offload_dir=tmp_path) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == quantized_reference("int4")
    with load_engine(path, policy=pol, plugins={"cache_compressor": "int4", "attention": "cpu"}, device="cuda",
                     dtype="float32", offload_dir=tmp_path) as engine:
        out = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    print(f"\nCUDA, int4 cache on cpu, cpu attention: agreement with uncompressed {agreement(out, uncompressed):.3f}")


@pytest.mark.parametrize("compressor", ["int4", "int8"])
@pytest.mark.parametrize("cache", list(CACHE_TIERS))
@pytest.mark.parametrize("attention", ["gpu", "cpu"])
def test_packed_cache_read_in_place_equals_decompress_then_attend(checkpoint, tmp_path, compressor, cache, attention):
    """The attention backends read a compressed cache as it is (PackedKV, dequantised block by
    block); the tokens are those of the engine decompressing the whole prefix first."""
    path, _ = checkpoint
    plugins = {"cache_compressor": compressor, "attention": attention}
    seen = []
    with load_engine(path, policy=policy(cache=cache), plugins=plugins, device="cpu", dtype="float32",
                     offload_dir=tmp_path) as engine:
        decode = engine.attention.decode
        engine.attention.decode = lambda q, k, v, valid: seen.append(type(k).__name__) or decode(q, k, v, valid)
        packed = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        engine.attention.reads_packed_cache = False  # the instance only: decompress, then attend
        plain = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert seen and set(seen) == {"PackedKV", "Tensor"}
    assert packed == plain


@pytest.mark.parametrize("attention", ["gpu", "cpu"])
def test_unpadded_blocks_attend_without_a_mask(checkpoint, tmp_path, attention):
    """Prompts of one length need no mask: the backends get ``valid=None`` (on a GPU, SDPA may then
    use its fused kernels), and the tokens are those of the masked computation."""
    path, _ = checkpoint
    prompts = [p[:3] for p in PROMPTS if len(p) >= 3] * 2  # 8 prompts of 3 tokens
    seen = []
    with load_engine(path, policy=policy(), plugins={"attention": attention}, device="cpu", dtype="float32",
                     offload_dir=tmp_path) as engine:
        prefill, decode = engine.attention.prefill, engine.attention.decode
        engine.attention.prefill = lambda q, k, v, valid: seen.append(valid) or prefill(q, k, v, valid)
        engine.attention.decode = lambda q, k, v, valid: seen.append(valid) or decode(q, k, v, valid)
        unmasked = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert seen and all(valid is None for valid in seen)
        engine.attention.accepts_unmasked = False
        seen.clear()
        masked = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        assert seen and all(valid is not None for valid in seen)
    assert unmasked == masked
