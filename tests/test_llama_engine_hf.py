"""The engine runs Llama, Mistral and Qwen2 checkpoints and its greedy tokens equal HF transformers'.

float32 on the CPU; tiny random ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` checkpoints written by ``save_pretrained`` (grouped-query and not, tied and
untied heads, a rope scaling type, biases, a sliding window shorter than the sequence);
prompts of unequal length, more prompts than one block, weights and caches in every tier,
both attention backends, both schedulers, one and three GPU batches. The default suite runs a
spread of those combinations; the whole grid is behind ``-m slow``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flexgen import Policy, load_engine, registry
from flexgen.testing.reference import agreement, hf_greedy, round_tripped
from tests.test_llama_math import LLAMA3_ROPE, _hf_model

#: Prompts longer than the windows below (4 and 3), so the window cuts both prefill and decode.
PROMPTS = [[1, 15, 16, 17, 18, 19], [1, 40, 41], [1, 7, 8, 9, 10, 11, 12, 13, 14], [1, 33], [1, 50, 51, 52, 53]]
NEW_TOKENS = 5

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied-biases": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True,
                                        "attention_bias": True, "mlp_bias": True}),
    "llama-mqa-llama3-rope": ("llama", {"num_key_value_heads": 1, "rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-upper-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
}

PLACEMENTS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (30, 30)}
#: (weights, cache, attention, scheduler, num_gpu_batches): each tier, backend, scheduler and
#: batch count at least once, the window and GQA paths through every kind of cache read
#: (in place, prefetched from another tier, packed).
SPREAD = [
    ("gpu", "gpu", "gpu", "zigzag", 1),
    ("mix", "mix", "cpu", "zigzag", 3),
    ("disk", "cpu", "gpu", "row", 3),
    ("cpu", "disk", "cpu", "row", 1),
]
GRID = list(itertools.product(PLACEMENTS, PLACEMENTS, ["gpu", "cpu"], ["zigzag", "row"], [1, 3]))


def policy(weights: str, cache: str, num_gpu_batches: int, acts_follow_cache: bool = True) -> Policy:
    """Activations follow the cache's placement (so they travel through every tier too) unless told not to."""
    acts = PLACEMENTS[cache] if acts_follow_cache else PLACEMENTS["gpu"]
    return Policy(
        gpu_batch_size=2, num_gpu_batches=num_gpu_batches,
        weights_gpu=PLACEMENTS[weights][0], weights_cpu=PLACEMENTS[weights][1],
        cache_gpu=PLACEMENTS[cache][0], cache_cpu=PLACEMENTS[cache][1],
        act_gpu=acts[0], act_cpu=acts[1],
    )


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    model = _hf_model(model_type, **overrides)
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    model.save_pretrained(path)
    return path, model, hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0), tmp_path_factory.mktemp("offload")


def run(path, offload, weights, cache, attention, scheduler, num_gpu_batches, **plugins) -> list[list[int]]:
    with load_engine(path, policy=policy(weights, cache, num_gpu_batches),
                     plugins={"attention": attention, "scheduler": scheduler, **plugins},
                     device="cpu", dtype="float32", offload_dir=offload) as engine:
        return engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("weights,cache,attention,scheduler,num_gpu_batches", SPREAD)
def test_greedy_equals_hf(reference, weights, cache, attention, scheduler, num_gpu_batches):
    path, _, expected, offload = reference
    assert run(path, offload, weights, cache, attention, scheduler, num_gpu_batches) == expected


@pytest.mark.slow
@pytest.mark.parametrize("weights,cache,attention,scheduler,num_gpu_batches", GRID)
def test_greedy_equals_hf_every_combination(reference, weights, cache, attention, scheduler, num_gpu_batches):
    path, _, expected, offload = reference
    assert run(path, offload, weights, cache, attention, scheduler, num_gpu_batches) == expected


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window"])
def test_host_attention_on_its_worker_equals_hf(case, tmp_path):
    """CPU delegation on the attention worker (as on a GPU machine) reads a grouped, windowed host cache."""
    model_type, overrides = CASES[case]
    model = _hf_model(model_type, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    started = []
    with load_engine(tmp_path / "ckpt", policy=policy("cpu", "cpu", 3, acts_follow_cache=False), plugins={"attention": "cpu"},
                     device="cpu", dtype="float32", offload_dir=tmp_path / "offload") as engine:
        engine.host_attention_on_worker = True
        start = engine.attend.start_on_host
        engine.attend.start_on_host = lambda *args: started.append(1) or start(*args)
        out = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert started, "no decode attention ran on the worker"
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0)


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window"])
def test_cache_holds_kv_heads_and_the_backends_get_them_uncopied(case, tmp_path):
    """The cache is (token, batch, KV head, dim), and attention receives the KV heads as they are
    (both built-in backends accept grouped-query attention); a windowed decode reads the window only."""
    model_type, overrides = CASES[case]
    _hf_model(model_type, **overrides).save_pretrained(tmp_path / "ckpt")
    heads, lengths = [], []
    with load_engine(tmp_path / "ckpt", policy=policy("gpu", "gpu", 1), device="cpu", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        decode = engine.attention.decode
        engine.attention.decode = lambda q, k, v, valid: (heads.append((q.shape[1], k.shape[1])),
                                                          lengths.append(k.shape[2]), decode(q, k, v, valid))[-1]
        engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        unit = engine.cache.units[0][0]
        assert tuple(unit.k["data"].shape[2:]) == (engine.spec.num_kv_heads, engine.spec.head_dim)
    assert set(heads) == {(4, 2)}
    window = overrides.get("sliding_window")
    if window is not None:
        assert max(lengths) == window
    else:
        assert max(lengths) == max(map(len, PROMPTS)) + NEW_TOKENS - 1


def test_a_backend_without_grouped_kv_gets_repeated_heads(tmp_path):
    """A backend written before GQA (``accepts_grouped_kv`` False) still computes the same tokens:
    the engine repeats each KV head for its query heads."""
    model = _hf_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    heads = []
    with load_engine(tmp_path / "ckpt", policy=policy("gpu", "cpu", 1), plugins={"attention": "cpu"},
                     device="cpu", dtype="float32", offload_dir=tmp_path / "offload") as engine:
        engine.attention.accepts_grouped_kv = False  # the instance only
        decode = engine.attention.decode
        engine.attention.decode = lambda q, k, v, valid: heads.append(k.shape[1]) or decode(q, k, v, valid)
        out = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert set(heads) == {4}
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0)


@pytest.mark.parametrize("case,weights", [("llama-gqa", "cpu"), ("qwen2-tied", "disk"), ("mistral-window", "mix")])
def test_int4_weights_equal_hf_on_the_same_quantised_weights(case, weights, tmp_path):
    """int4 weights: the tokens HF gives on the same weights after compress -> decompress."""
    model_type, overrides = CASES[case]
    model = _hf_model(model_type, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    expected = hf_greedy(round_tripped(model, registry.create("compressor", "int4")), PROMPTS, NEW_TOKENS,
                         pad_token_id=0)
    out = run(tmp_path / "ckpt", tmp_path / "offload", weights, "cpu", "cpu", "zigzag", 1, weight_compressor="int4")
    assert out == expected


@pytest.mark.parametrize("cache,attention", [("gpu", "gpu"), ("cpu", "cpu"), ("disk", "gpu")])
def test_compressed_cache_read_packed_equals_decompress_then_attend(cache, attention, tmp_path):
    """An int4 cache of KV heads read as it is (PackedKV, grouped queries) gives the tokens of the
    engine decompressing the window's prefix first."""
    model = _hf_model("mistral", sliding_window=4)
    model.save_pretrained(tmp_path / "ckpt")
    with load_engine(tmp_path / "ckpt", policy=policy("gpu", cache, 1),
                     plugins={"cache_compressor": "int4", "attention": attention}, device="cpu", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        packed = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        engine.attention.reads_packed_cache = False
        plain = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert packed == plain
    exact = hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0)
    print(f"\nint4 cache ({cache}, {attention} attention): agreement with HF {agreement(packed, exact):.3f}")


def test_bin_and_sharded_checkpoints_load(tmp_path):
    """``.bin`` files and sharded safetensors map through the family's checkpoint names alike."""
    model = _hf_model("qwen2", tie_word_embeddings=True)
    expected = hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "bin" / "pytorch_model.bin")
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    for folder in ("sharded", "bin"):
        assert run(tmp_path / folder, tmp_path / "offload", "cpu", "cpu", "cpu", "zigzag", 1) == expected, folder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window", "qwen2-upper-window"])
@pytest.mark.parametrize("weights,cache,attention", [("gpu", "gpu", "gpu"), ("cpu", "cpu", "cpu"), ("mix", "mix", "gpu")])
def test_greedy_on_cuda_equals_hf(case, weights, cache, attention, tmp_path):
    """On CUDA: GQA through SDPA's kernels (and the host worker for CPU attention), float32 tokens equal HF's."""
    model_type, overrides = CASES[case]
    model = _hf_model(model_type, **overrides)
    model.save_pretrained(tmp_path / "ckpt")
    with load_engine(tmp_path / "ckpt", policy=policy(weights, cache, 3, acts_follow_cache=False),
                     plugins={"attention": attention}, device="cuda", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        out = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert out == hf_greedy(model, PROMPTS, NEW_TOKENS, pad_token_id=0)


def test_flexgen_predict_runs_a_mistral_checkpoint(tmp_path):
    """The predict path end to end on a windowed GQA checkpoint: token-id prompts in, HF's greedy tokens out."""
    import json

    from flexgen.config import load_config
    from flexgen.predict.run import run_predict

    model = _hf_model("mistral", sliding_window=4)
    model.save_pretrained(tmp_path / "ckpt")
    prompts = {f"p{i}": p for i, p in enumerate(PROMPTS)}
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": k, "input_ids": p}) + "\n" for k, p in prompts.items()))
    (tmp_path / "c.yaml").write_text(
        f"model:\n  path: {tmp_path / 'ckpt'}\n  dtype: float32\ndata:\n  prompts: {tmp_path / 'p.jsonl'}\n"
        f"generation:\n  max_new_tokens: {NEW_TOKENS}\ntrainer:\n  accelerator: cpu\n  enable_progress_bar: false\n"
        f"output:\n  path: {tmp_path / 'out.jsonl'}\n  offload_dir: {tmp_path / 'offload'}\n"
    )
    run_predict(load_config(tmp_path / "c.yaml", []))
    lines = {line["id"]: line for line in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(lines) == sorted(prompts)
    eos = model.config.eos_token_id
    for key, ids in prompts.items():
        expected = hf_greedy(model, [ids], NEW_TOKENS, pad_token_id=0)[0]
        if eos in expected:  # predict stops after the model's end-of-sequence token
            expected = expected[: expected.index(eos) + 1]
        assert lines[key]["output_ids"] == expected, key
