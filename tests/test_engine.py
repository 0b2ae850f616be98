"""Engine behaviour beyond agreement with HF: input checks, sampling, stop tokens, stats, disk reuse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flexgen import Policy, load_engine
from flexgen.errors import CheckpointError, PluginError, PolicyError, PromptError
from flexgen.models.checkpoint import SyntheticWeights
from flexgen.models.opt import OPTSpec, spec_for_size

PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11], [2, 99, 98]]


@pytest.fixture
def engine(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    with load_engine(path, policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path) as engine:
        yield engine


# ---------------------------------------------------------------- bad input, one line each


@pytest.mark.parametrize("values, culprit", [
    (dict(weights_gpu=120), "policy.weights_gpu"),
    (dict(cache_cpu=-1), "policy.cache_cpu"),
    (dict(act_gpu=60, act_cpu=50), "policy.act_gpu + policy.act_cpu"),
    (dict(gpu_batch_size=0), "policy.gpu_batch_size"),
    (dict(num_gpu_batches=0), "policy.num_gpu_batches"),
])
def test_bad_policy_names_the_key(values, culprit):
    with pytest.raises(PolicyError, match=r"^" + culprit.replace("+", r"\+")) as info:
        Policy(**values)
    assert "\n" not in str(info.value)


def test_unknown_plugin_lists_available(tiny_checkpoint, tmp_path):
    with pytest.raises(PluginError, match=r"unknown attention plugin 'nope'; available: .*cpu.*gpu"):
        load_engine(tiny_checkpoint[0], plugins={"attention": "nope"}, device="cpu", offload_dir=tmp_path)


def test_missing_and_non_opt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a model size"):
        load_engine(tmp_path / "missing", device="cpu")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"model_type .bert. is not one flexgen runs; registered model families: llama \(llama, mistral, qwen2\); opt \(opt\)"):
        load_engine(tmp_path / "bert", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_engine(tmp_path / "empty", device="cpu")


def test_truncated_weight_file_is_named(tiny_checkpoint, tmp_path):
    source, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name + ": truncated or corrupt"):
        load_engine(broken, device="cpu", offload_dir=tmp_path / "offload")


def test_corrupt_bin_file_is_named(tmp_path):
    from tests.conftest import make_checkpoint

    make_checkpoint(tmp_path, "no_bias_gelu_bin")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: truncated, corrupt or unsafe"):
        load_engine(tmp_path, device="cpu", offload_dir=tmp_path / "offload")


@pytest.mark.parametrize("prompts, message", [
    ([[2, 3], []], "prompt 1 is empty"),
    ([[2, 100000]], "prompt 0: token id 100000 is outside the vocabulary"),
    ([[2, -1]], "prompt 0: token id -1 is outside"),
    ([[2] * 95], "prompt 0: 95 tokens \\+ max_new_tokens 4 exceed the model's 96 positions"),
])
def test_bad_prompts(engine, prompts, message):
    with pytest.raises(PromptError, match=message):
        engine.generate(prompts, max_new_tokens=4)


def test_bad_generation_arguments(engine):
    with pytest.raises(PromptError, match="max_new_tokens"):
        engine.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(PromptError, match="top_p"):
        engine.generate(PROMPTS, do_sample=True, top_p=0)
    with pytest.raises(PromptError, match="temperature"):
        engine.generate(PROMPTS, do_sample=True, temperature=0)


# ---------------------------------------------------------------- generation


def test_any_number_of_prompts(engine):
    one_by_one = [engine.generate([p], max_new_tokens=5)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS[:3], max_new_tokens=5) == one_by_one[:3]  # last block padded
    assert engine.generate(PROMPTS * 3, max_new_tokens=5) == one_by_one * 3
    assert engine.generate([], max_new_tokens=5) == []


def test_sampling_is_reproducible_with_a_seed(engine):
    first = engine.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    again = engine.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    other = engine.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=8)
    greedy = engine.generate(PROMPTS, max_new_tokens=8)
    assert first == again
    assert first != other and first != greedy


def test_tiny_top_p_is_greedy(engine):
    # Nucleus sampling with a nucleus of one token always takes the most likely token.
    sampled = engine.generate(PROMPTS, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=3)
    assert sampled == engine.generate(PROMPTS, max_new_tokens=6)


def test_stop_token_ends_each_sequence(engine):
    greedy = engine.generate(PROMPTS, max_new_tokens=8)
    stop = greedy[0][2]  # the third token of the first sequence
    stopped = engine.generate(PROMPTS, max_new_tokens=8, stop=[stop])
    for full, cut in zip(greedy, stopped):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:end]
    assert len(stopped[0]) == 3


def test_stats_count_tokens_and_traffic(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=0, weights_cpu=0)
    with load_engine(path, policy=policy, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        engine.generate(PROMPTS[:3], max_new_tokens=4)
        stats = engine.stats.to_dict()
    assert stats["prompt_tokens"] == sum(map(len, PROMPTS[:3]))
    assert stats["generated_tokens"] == 3 * 4  # the padding sequence is not counted
    assert stats["prefill_time_s"] > 0 and stats["decode_time_s"] > 0
    # Zig-zag reads every disk-resident weight once per step (4 steps, all weights on disk),
    # except the embedding tables: of those each GPU batch reads the rows of its tokens.
    spec = engine.spec
    tables = spec.vocab_size * spec.word_embed_proj_dim + (spec.max_positions + 2) * spec.hidden_size
    row = spec.word_embed_proj_dim + spec.hidden_size
    prompt_len = max(map(len, PROMPTS[:3]))
    rows = 2 * 2 * (prompt_len + 3)  # 2 batches x 2 sequences: the prompt, then 3 decode steps of 1 token
    expected = 4 * (stats["compression"]["weights_stored_bytes"] - 4 * tables) + 4 * rows * row
    assert stats["bytes_moved"]["disk->cpu"] == expected
    assert stats["peak_memory"]["disk"] >= stats["compression"]["weights_stored_bytes"]
    assert stats["total_throughput"] == pytest.approx(12 / (stats["prefill_time_s"] + stats["decode_time_s"]))


def test_row_schedule_reloads_weights_per_batch(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    moved = {}
    for scheduler in ("zigzag", "row"):
        policy = Policy(gpu_batch_size=1, num_gpu_batches=3, weights_gpu=0, weights_cpu=0)
        with load_engine(path, policy=policy, plugins={"scheduler": scheduler}, device="cpu",
                         dtype="float32", offload_dir=tmp_path) as engine:
            engine.generate(PROMPTS[:3], max_new_tokens=2)
            moved[scheduler] = engine.stats.bytes_moved["disk->cpu"]
    spec = engine.spec
    # The embedding rows of each batch's tokens are read once whatever the order: 3 sequences
    # of the prompt length, then one token each.
    rows = 3 * (max(map(len, PROMPTS[:3])) + 1) * (spec.word_embed_proj_dim + spec.hidden_size) * 4
    assert moved["row"] - rows == 3 * (moved["zigzag"] - rows)


# ---------------------------------------------------------------- disk-tier conversion


def _disk_policy():
    return Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=0)


def _weight_files(folder):
    return sorted(p for p in folder.rglob("*.safetensors"))


def test_converted_weights_are_reused(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    with load_engine(path, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        expected = e.generate(PROMPTS, max_new_tokens=4)
    files = _weight_files(tmp_path)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    with load_engine(path, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        assert e.generate(PROMPTS, max_new_tokens=4) == expected
    assert _weight_files(tmp_path) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing rewritten


def test_changed_checkpoint_invalidates_conversion(tmp_path):
    from tests.conftest import make_checkpoint

    ckpt, offload = tmp_path / "ckpt", tmp_path / "offload"
    make_checkpoint(ckpt, "pre_ln", seed=0)
    with load_engine(ckpt, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=offload) as e:
        e.generate(PROMPTS, max_new_tokens=3)
    model = make_checkpoint(ckpt, "pre_ln", seed=1)  # new weights, same paths
    from flexgen.testing.reference import hf_greedy

    with load_engine(ckpt, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=offload) as e:
        assert e.generate(PROMPTS, max_new_tokens=3) == hf_greedy(model, PROMPTS, 3)


def test_interrupted_conversion_is_redone(tiny_checkpoint, tmp_path):
    path, model = tiny_checkpoint
    with load_engine(path, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        expected = e.generate(PROMPTS, max_new_tokens=4)
    files = _weight_files(tmp_path)
    files[0].unlink()  # a conversion killed before this tensor was written
    files[1].write_bytes(files[1].read_bytes()[:20])  # or a file damaged after the fact
    (files[2].parent / ".leftover.123.tmp").write_bytes(b"partial")  # a temporary left behind
    with load_engine(path, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        assert e.generate(PROMPTS, max_new_tokens=4) == expected
    assert _weight_files(tmp_path) == files


def test_two_processes_share_an_offload_dir(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    path, _ = tiny_checkpoint
    script = (
        "import sys, json, torch; torch.set_num_threads(1)\n"
        "from flexgen import Policy, load_engine\n"
        f"e = load_engine({str(path)!r}, policy=Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=0),"
        f" device='cpu', dtype='float32', offload_dir={str(tmp_path)!r})\n"
        f"print(json.dumps(e.generate({PROMPTS!r}, max_new_tokens=4)))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    with load_engine(path, policy=_disk_policy(), device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        assert outputs == [e.generate(PROMPTS, max_new_tokens=4)] * 3


def test_scratch_files_are_removed(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    policy = Policy(gpu_batch_size=2, cache_gpu=0, cache_cpu=0, act_gpu=0, act_cpu=0)
    with load_engine(path, policy=policy, device="cpu", dtype="float32", offload_dir=tmp_path) as e:
        e.generate(PROMPTS, max_new_tokens=3)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and "weights" not in p.parts]
    assert leftovers == []


# ---------------------------------------------------------------- synthetic weights


def test_synthetic_weights_do_not_depend_on_placement(tmp_path):
    prompts = [[2, 5, 6], [2, 9]]
    outs = []
    for weights_gpu, weights_cpu in ((100, 0), (0, 100), (0, 0), (30, 30)):
        policy = Policy(gpu_batch_size=2, weights_gpu=weights_gpu, weights_cpu=weights_cpu)
        with load_engine("opt-125m", policy=policy, device="cpu", dtype="float32", offload_dir=tmp_path) as e:
            outs.append(e.generate(prompts, max_new_tokens=3))
    assert all(o == outs[0] for o in outs)


def test_synthetic_weights_are_seeded():
    spec = OPTSpec(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, ffn_dim=16, max_positions=8,
                   word_embed_proj_dim=8)
    from flexgen.models.opt import layer_weights

    w = layer_weights(spec, 1)[0]
    a, b, c = (SyntheticWeights(spec, seed=s, dtype=torch.float32).get(w) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.005 < a.std().item() < 0.05


def _synthetic_matrix(rows: int, cols: int, name: str = "layers.0.fc1.weight"):
    from flexgen.models.opt import WeightSpec

    return WeightSpec(name, (rows, cols), "normal")


@pytest.mark.parametrize("rows,cols", [(1, 7), (63, 5), (64, 3), (130, 129), (300, 40)])
def test_synthetic_weights_do_not_depend_on_layout_or_table_growth(rows, cols):
    """The same seed gives the same values whether the tensor is laid out row- or column-major,
    and whether the seed's table was grown for a larger tensor first (rows not a multiple of the
    row group included)."""
    spec = spec_for_size("opt-125m")
    weight = _synthetic_matrix(rows, cols)
    fresh = SyntheticWeights(spec, seed=5, dtype=torch.float32)
    row_major = fresh.get(weight)
    grown = SyntheticWeights(spec, seed=5, dtype=torch.float32)
    grown.get(_synthetic_matrix(50_000, 3_000, "lm_head.weight"))  # grows the table past its first chunk
    column_major = grown.get(weight, column_major=True)
    assert column_major.stride() == (1, rows)
    assert torch.equal(row_major, column_major)
    assert torch.isfinite(row_major).all() and row_major.std().item() > 0.005
    if rows > 1:
        assert not torch.equal(row_major[0], row_major[-1])


def test_synthetic_weights_differ_per_tensor_and_fingerprint_names_the_fill():
    spec = spec_for_size("opt-125m")
    source = SyntheticWeights(spec, seed=0, dtype=torch.float16)
    a = source.get(_synthetic_matrix(64, 64, "layers.0.fc1.weight"))
    b = source.get(_synthetic_matrix(64, 64, "layers.0.fc2.weight"))
    assert a.dtype == torch.float16 and not torch.equal(a, b)
    assert source.fingerprint() != SyntheticWeights(spec, seed=1, dtype=torch.float16).fingerprint()


@pytest.mark.gpu
def test_synthetic_weights_are_the_same_drawn_on_cuda():
    spec = spec_for_size("opt-125m")
    source = SyntheticWeights(spec, seed=2, dtype=torch.float16)
    for weight in (_synthetic_matrix(130, 129), _synthetic_matrix(768, 3072)):
        on_cuda = source.get(weight, device="cuda", column_major=True)
        assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), source.get(weight))


# ---------------------------------------------------------------- the fetched-cache path


@pytest.mark.parametrize("cache_compressor", ["none", "int4"])
@pytest.mark.parametrize("scheduler", ["zigzag", "row"])
def test_fetched_cache_path_equals_in_place_path(tiny_checkpoint, tmp_path, monkeypatch, cache_compressor, scheduler):
    """On a GPU, attention away from the cache's home prefetches the cache prefix on an I/O
    thread and appends the new token; on a CPU every tier is where attention runs, so force
    that path here and require the tokens of the in-place path."""
    from flexgen.engine.kv_cache import KVCache

    path, _ = tiny_checkpoint
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu=30, cache_cpu=30)  # a mix of tiers
    plugins = {"cache_compressor": cache_compressor, "scheduler": scheduler}

    def run():
        with load_engine(path, policy=policy, plugins=plugins, device="cpu", dtype="float32",
                         offload_dir=tmp_path) as engine:
            return engine.generate(PROMPTS, max_new_tokens=6)

    in_place = run()
    fetched_units = []
    monkeypatch.setattr(KVCache, "resident_where_attended",
                        lambda self, unit: fetched_units.append(unit.tier) or unit.tier == "gpu")
    assert run() == in_place
    assert {"cpu", "disk"} <= set(fetched_units)


def test_kv_cache_is_allocated_once_and_reused_by_later_blocks(tiny_checkpoint, tmp_path):
    """Zero-filling and page-locking a host cache is expensive: an engine allocates it once and
    reuses it for every block that fits, and allocates anew only for a longer block."""
    path, _ = tiny_checkpoint
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu=0, cache_cpu=100)
    with load_engine(path, policy=policy, device="cpu", dtype="float32", offload_dir=tmp_path) as engine:
        allocations = []
        empty = engine.storage["cpu"].empty
        engine.storage["cpu"].empty = lambda *args: allocations.append(args[0]) or empty(*args)
        first = engine.generate(PROMPTS * 3, max_new_tokens=4)  # three blocks
        units = len(allocations)
        assert units == 2 * engine.spec.num_layers * 2 * 1  # k and v, per (layer, batch), one part each
        assert engine.generate(PROMPTS, max_new_tokens=3) == [row[:3] for row in first[:4]]
        assert len(allocations) == units  # shorter: reused
        engine.generate(PROMPTS, max_new_tokens=8)
        assert len(allocations) == 2 * units  # longer: allocated anew
        assert engine.storage["cpu"].nbytes() > 0
    assert engine.storage["cpu"].nbytes() == 0  # freed at close


def test_an_error_on_the_attention_worker_reaches_the_caller_and_the_engine_goes_on(tiny_checkpoint, tmp_path):
    """A failure inside host attention on its worker surfaces from generate (no hang), and the
    engine, its cache and its threads still serve the next call."""
    path, _ = tiny_checkpoint
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu=0, cache_cpu=100)
    with load_engine(path, policy=policy, plugins={"attention": "cpu"}, device="cpu", dtype="float32",
                     offload_dir=tmp_path) as engine:
        expected = engine.generate(PROMPTS, max_new_tokens=4)
        engine.host_attention_on_worker = True
        decode = engine.attention.decode

        def broken(*args):
            raise RuntimeError("attention broke")

        engine.attention.decode = broken
        with pytest.raises(RuntimeError, match="attention broke"):
            engine.generate(PROMPTS, max_new_tokens=4)
        engine.attention.decode = decode
        assert engine.generate(PROMPTS, max_new_tokens=4) == expected
