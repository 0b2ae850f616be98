"""The cost model: hand counts on a tiny shape, monotonicity, and the engine's own byte counts."""

from __future__ import annotations

import json

import pytest
import torch

from flexgen.planner.costmodel import Workload, cache_unit_counts, count_below, estimate
from flexgen.errors import ConfigError
from flexgen.planner.hardware import GB, HardwareProfile, PRESETS, parse_bytes, parse_rate
from flexgen.models import opt
from flexgen.models.opt import OPTSpec
from flexgen.policy import Policy, split_by_percent

TINY = OPTSpec(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_dim=32, max_positions=64,
               word_embed_proj_dim=16, name="tiny")

#: A GPU machine with round numbers, so times are easy to check by hand.
FAKE_GPU = HardwareProfile(
    name="fake-gpu", device="cuda", gpu_memory=16 * GB, cpu_memory=64 * GB, disk_memory=1000 * GB,
    h2d_bandwidth=10 * GB, d2h_bandwidth=10 * GB, disk_read_bandwidth=1 * GB, disk_write_bandwidth=1 * GB,
    gpu_flops_fp16=100e12, gpu_flops_bf16=100e12, gpu_flops_fp32=10e12, gpu_memory_bandwidth=1000 * GB,
    cpu_flops=1e12, cpu_attention_flops=10e9, cpu_memory_bandwidth=50 * GB, task_overhead_s=0.0,
)
FAKE_CPU = HardwareProfile(
    name="fake-cpu", device="cpu", gpu_memory=8 * GB, cpu_memory=8 * GB, disk_memory=100 * GB,
    h2d_bandwidth=10 * GB, d2h_bandwidth=10 * GB, disk_read_bandwidth=1 * GB, disk_write_bandwidth=1 * GB,
    gpu_flops_fp16=1e11, gpu_flops_bf16=1e11, gpu_flops_fp32=1e11, gpu_memory_bandwidth=20 * GB,
    cpu_flops=1e11, cpu_attention_flops=1e10, cpu_memory_bandwidth=20 * GB, task_overhead_s=0.0, shared_memory=True,
)

S, N = 4, 3  # prompt length, new tokens


def weight_bytes(spec: OPTSpec) -> int:
    """Bytes of every weight in float16, as the engine stores them."""
    return opt.weight_bytes(spec, torch.float16)


def table_bytes(spec: OPTSpec) -> int:
    """Bytes of the two embedding tables in float16."""
    return 2 * (spec.vocab_size * spec.word_embed_proj_dim + (spec.max_positions + 2) * spec.hidden_size)


def gathered_bytes(spec: OPTSpec, sequences: int) -> int:
    """Embedding rows read over a run of ``sequences`` sequences (the prompt's S tokens, then one
    per decode step), float16: the engine gathers them where the tables live."""
    return sequences * (S + N - 1) * (spec.word_embed_proj_dim + spec.hidden_size) * 2


def test_weights_on_cpu_cross_pcie_once_per_step():
    est = estimate(TINY, Policy(2, 2, 0, 100, 100, 0, 100, 0), (S, N), FAKE_GPU)
    total = est.prefill.bytes["cpu->gpu"] + est.decode.bytes["cpu->gpu"]
    # zig-zag: once per step, whatever the GPU batches; of the embedding tables only the rows read
    assert total == N * (weight_bytes(TINY) - table_bytes(TINY)) + gathered_bytes(TINY, 4)
    assert est.prefill.bytes["gpu->cpu"] == est.decode.bytes["gpu->cpu"] == 0
    unpinned = estimate(TINY, Policy(2, 2, 0, 100, 100, 0, 100, 0, pin_weights=False), (S, N), FAKE_GPU)
    assert unpinned.memory["cpu"]["weights"] == weight_bytes(TINY)


def test_pinning_costs_no_memory_but_copies_faster():
    """The CPU tier page-locks its own allocations (cudaHostRegister): pinned tensors take their
    plain bytes, and only the copy bandwidth differs between pinned and pageable memory."""
    spec = opt.spec_for_size("opt-30b")
    policy = Policy(48, 1, 0, 100, 0, 100, 100, 0)
    pinned = estimate(spec, policy, (512, 32), FAKE_GPU)
    plain = estimate(spec, Policy(48, 1, 0, 100, 0, 100, 100, 0, pin_weights=False), (512, 32), FAKE_GPU)
    unit = 2 * (512 + 32) * 48 * spec.hidden_size * 2  # k and v of one (layer, batch), 374 MB
    assert plain.memory["cpu"]["cache"] == pinned.memory["cpu"]["cache"] == spec.num_layers * unit
    assert pinned.memory["cpu"]["weights"] == plain.memory["cpu"]["weights"] == weight_bytes(spec)
    assert pinned.memory == plain.memory
    # the same bytes cross PCIe, at the pinned rate (10 GB/s) against the pageable one (half)
    for phase in ("prefill", "decode"):
        p, q = getattr(pinned, phase), getattr(plain, phase)
        assert p.bytes == q.bytes
        assert q.times["cpu->gpu"] == pytest.approx(2 * p.times["cpu->gpu"])
        assert q.times["gpu->cpu"] == pytest.approx(2 * p.times["gpu->cpu"])
    assert pinned.predicted_throughput > plain.predicted_throughput
    # without CUDA nothing is pinned, and the memory is the same again
    assert estimate(spec, policy, (512, 32), FAKE_CPU).memory["cpu"]["cache"] == spec.num_layers * unit


def test_row_schedule_reloads_weights_per_batch():
    est = estimate(TINY, Policy(2, 3, 0, 100, 100, 0, 100, 0), (S, N), FAKE_GPU, scheduler="row")
    moved = est.prefill.bytes["cpu->gpu"] + est.decode.bytes["cpu->gpu"]
    assert moved == 3 * N * (weight_bytes(TINY) - table_bytes(TINY)) + gathered_bytes(TINY, 6)


def test_cache_on_cpu_hand_count():
    B, K, L, h = 2, 1, TINY.num_layers, TINY.hidden_size
    per_token = 2 * B * h * 2  # k and v, fp16, one GPU batch
    est = estimate(TINY, Policy(B, K, 100, 0, 0, 100, 100, 0), (S, N), FAKE_GPU, attention="gpu")
    # prefill writes the prompt's keys and values home
    assert est.prefill.bytes["gpu->cpu"] == L * S * per_token
    assert est.prefill.bytes["cpu->gpu"] == 0
    # decode step i reads the prefix of s + i tokens and writes one token
    steps = range(1, N)
    assert est.decode.bytes["cpu->gpu"] == pytest.approx(L * per_token * sum(S + i for i in steps))
    assert est.decode.bytes["gpu->cpu"] == L * per_token * (N - 1)
    # with CPU attention the cache stays on the host
    cpu = estimate(TINY, Policy(B, K, 100, 0, 0, 100, 100, 0), (S, N), FAKE_GPU, attention="cpu")
    assert cpu.decode.bytes["cpu->gpu"] == 0
    assert cpu.decode.cpu_flops == pytest.approx(L * 4 * B * h * sum(S + i for i in steps))


def test_flops_hand_count():
    B, h, f, V = 2, TINY.hidden_size, TINY.ffn_dim, TINY.vocab_size
    L = TINY.num_layers
    est = estimate(TINY, Policy(B, 1), (S, N), FAKE_GPU)
    prefill = L * (8 * B * S * h * h + 4 * B * S * S * h + 4 * B * S * h * f) + 2 * B * h * V
    assert est.prefill.gpu_flops == prefill
    decode = sum(L * (8 * B * h * h + 4 * B * (S + i) * h + 4 * B * h * f) + 2 * B * h * V for i in range(1, N))
    assert est.decode.gpu_flops == pytest.approx(decode)


def test_disk_weights_are_read_then_copied():
    est = estimate(TINY, Policy(2, 1, 0, 0, 100, 0, 100, 0), (S, N), FAKE_GPU)
    total_disk = est.prefill.bytes["disk->cpu"] + est.decode.bytes["disk->cpu"]
    assert total_disk == N * (weight_bytes(TINY) - table_bytes(TINY)) + gathered_bytes(TINY, 2)
    assert est.memory["disk"]["weights"] == weight_bytes(TINY)


def test_throughput_definition_and_bound():
    est = estimate(opt.spec_for_size("opt-1.3b"), Policy(8, 2, 50, 50, 50, 50, 100, 0), (64, 16), FAKE_GPU)
    assert est.generated_tokens == 16 * 16
    assert est.predicted_throughput == pytest.approx(est.generated_tokens / (est.prefill.predicted_s + est.decode.predicted_s))
    # the roofline is a bound: no prediction beats it
    assert est.bound_throughput >= est.predicted_throughput
    assert est.prefill.bottleneck in est.prefill.times
    json.dumps(est.to_dict())  # serialisable for --json and bench


def test_num_prompts_counts_partial_blocks():
    est = estimate(TINY, Policy(4, 2), Workload(S, N, num_prompts=10), FAKE_GPU)
    assert est.num_blocks == 2 and est.generated_tokens == 10 * N


@pytest.mark.parametrize("kind", ["weights", "cache"])
@pytest.mark.parametrize("attention", ["gpu", "cpu"])
def test_more_offloaded_never_less_io(kind, attention):
    """A placement with no more on the GPU, and no more on GPU+CPU, moves at least as many bytes."""
    spec = opt.spec_for_size("opt-1.3b")
    grid = [(g, c) for g in (100, 75, 50, 25, 0) for c in (0, 25, 50, 75, 100) if g + c <= 100]
    moved = {}
    for g, c in grid:
        values = {**dict(weights_gpu=100, weights_cpu=0, cache_gpu=100, cache_cpu=0), f"{kind}_gpu": g, f"{kind}_cpu": c}
        est = estimate(spec, Policy(8, 2, **values), (128, 8), FAKE_GPU, attention=attention)
        links = {k: est.prefill.bytes[k] + est.decode.bytes[k] for k in est.prefill.bytes}
        moved[g, c] = (links["cpu->gpu"] + links["gpu->cpu"] + links["disk->cpu"], links["disk->cpu"])
    for a in grid:
        for b in grid:
            if a[0] <= b[0] and a[0] + a[1] <= b[0] + b[1]:  # a is at least as offloaded as b
                assert moved[a][1] >= moved[b][1], (a, b)  # disk reads
                if kind == "weights" or attention == "gpu":
                    assert moved[a][0] >= moved[b][0], (a, b)


def test_memory_estimate_counts_every_tier():
    spec = opt.spec_for_size("opt-6.7b")
    pol = Policy(16, 2, 30, 40, 50, 25, 100, 0, pin_weights=False)
    est = estimate(spec, pol, (256, 32), FAKE_GPU)
    total_weights = sum(est.memory[t]["weights"] for t in ("gpu", "cpu", "disk"))
    assert total_weights == weight_bytes(spec)
    cache = 2 * spec.num_layers * pol.block_size * (256 + 32) * spec.hidden_size * 2
    assert sum(est.memory[t]["cache"] for t in ("gpu", "cpu", "disk")) == cache
    assert est.memory["gpu"]["staging"] > 0  # offloaded layers need fetch buffers
    assert estimate(spec, Policy(1, 1), (256, 32), FAKE_GPU).memory["gpu"]["staging"] == 0


def test_compression_shrinks_bytes():
    spec = opt.spec_for_size("opt-1.3b")
    pol = Policy(8, 1, 0, 100, 0, 100, 100, 0)
    raw = estimate(spec, pol, (64, 8), FAKE_GPU)
    small = estimate(spec, pol, (64, 8), FAKE_GPU, weight_compression="int4", cache_compression="int4")
    assert small.memory["cpu"]["weights"] < 0.3 * raw.memory["cpu"]["weights"]
    assert small.memory["cpu"]["cache"] < 0.3 * raw.memory["cpu"]["cache"]
    assert small.decode.bytes["cpu->gpu"] < 0.3 * raw.decode.bytes["cpu->gpu"]


def test_cache_unit_counts_follow_split_by_percent():
    for L, K, g, c in [(3, 4, 33.3, 33.3), (5, 2, 0, 100), (4, 3, 12.5, 0), (2, 8, 99.9, 0.1)]:
        tiers = split_by_percent([1] * (L * K), {"gpu": g, "cpu": c, "disk": 100 - g - c})
        counts = cache_unit_counts(TINY.__class__(**{**TINY.to_dict(), "num_layers": L}), Policy(1, K, 100, 0, g, c))
        assert sum(d.get("gpu", 0) for d in counts) == tiers.count("gpu")
        assert sum(d.get("cpu", 0) for d in counts) == tiers.count("cpu")
        assert count_below(g, L * K) == tiers.count("gpu")


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="positions"):
        estimate(TINY, Policy(1, 1), (60, 10), FAKE_GPU)
    with pytest.raises(ConfigError, match="attention"):
        estimate(TINY, Policy(1, 1), (4, 2), FAKE_GPU, attention="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        estimate(TINY, Policy(1, 1), (4, 2), FAKE_GPU, dtype="int8")


# --------------------------------------------------------------------------- hardware


@pytest.mark.parametrize("text,value", [
    ("24GiB", 24 << 30), ("16GB", 16 * 10**9), ("512MiB", 512 << 20), ("1.5TB", 1500 * 10**9), ("1000", 1000),
    (" 2 gib ", 2 << 30), (4096, 4096),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text, "hardware.gpu_memory") == value


@pytest.mark.parametrize("text", ["24XB", "GiB", "-1GB", "", True, None, "1e3 parsecs"])
def test_parse_bytes_errors_name_the_key(text):
    with pytest.raises(ConfigError, match="hardware.gpu_memory"):
        parse_bytes(text, "hardware.gpu_memory")


def test_parse_rate():
    assert parse_rate("12GB/s", "k", "B") == 12e9
    assert parse_rate("65 TFLOP/s", "k", "FLOP") == 65e12
    with pytest.raises(ConfigError, match="h2d_bandwidth"):
        parse_rate("fast", "h2d_bandwidth", "B")


def test_caps_and_presets():
    t4 = PRESETS["t4-paper"]
    assert t4.gpu_memory == 16 * GB and t4.cpu_memory == 208 * GB and t4.disk_memory == 1500 * GB
    capped = PRESETS["h200"].with_caps(gpu_memory="24GiB")
    assert capped.gpu_memory == 24 << 30 and capped.cpu_memory == PRESETS["h200"].cpu_memory
    assert "capped" in capped.source
    with pytest.raises(ConfigError, match="gpu_memory"):
        t4.with_caps(gpu_memory="lots")


def test_load_hardware_yaml(tmp_path):
    from flexgen.planner.hardware import load_hardware, save_hardware

    path = tmp_path / "box.yaml"
    path.write_text("base: t4-paper\ngpu_memory: 24GiB\nh2d_bandwidth: 25GB/s\ngpu_flops_fp16: 100 TFLOP/s\n")
    hw = load_hardware(path)
    assert hw.gpu_memory == 24 << 30 and hw.h2d_bandwidth == 25e9 and hw.gpu_flops("float16") == 100e12
    assert hw.cpu_memory == PRESETS["t4-paper"].cpu_memory
    save_hardware(hw, tmp_path / "again.yaml")
    assert load_hardware(tmp_path / "again.yaml").to_dict() == hw.to_dict()
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu_memory: 24GiB\nwarp_drive: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*warp_drive"):
        load_hardware(bad)
    partial = tmp_path / "partial.yaml"
    partial.write_text("gpu_memory: 24GiB\n")
    with pytest.raises(ConfigError, match="partial.yaml.*missing"):
        load_hardware(partial)
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_hardware(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("gpu_memory: [\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_hardware(broken)


def test_measure_hardware_quick_and_cached(tmp_path, monkeypatch):
    from flexgen.planner.hardware import measure_hardware

    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path))
    hw = measure_hardware("cpu", quick=True)
    assert hw.device == "cpu" and hw.shared_memory
    assert hw.gpu_memory == hw.cpu_memory > 0 and hw.disk_memory > 0
    for key in ("h2d_bandwidth", "disk_read_bandwidth", "disk_write_bandwidth", "gpu_flops_fp32", "cpu_attention_flops"):
        assert getattr(hw, key) > 0, key
    cached = list(tmp_path.glob("hardware-cpu-*.json"))
    assert len(cached) == 1
    assert measure_hardware("cpu", quick=True) == hw  # read back, not measured again


def test_cpu_rates_are_measured_on_every_usable_core_whatever_the_callers_threads(tmp_path, monkeypatch):
    """The profile is cached per machine: a caller left at one thread (an engine's governor on a
    busy machine) must not cache a one-thread matmul rate for every later run."""
    import torch

    from flexgen.planner import hardware
    from flexgen.threads import usable_cores

    seen = []
    real = hardware._matmul_rate
    monkeypatch.setattr(hardware, "_matmul_rate",
                        lambda *args, **kwargs: (seen.append(torch.get_num_threads()), real(*args, **kwargs))[1])
    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hardware.measure_hardware("cpu", quick=True)
        assert torch.get_num_threads() == 1  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {usable_cores()}


def test_next_layers_weights_load_while_the_current_layer_computes():
    """The engine starts loading layer j+1's weights when layer j starts, so a slow attention
    layer hides the (larger) MLP weights after it; the embedding's weights load before anything."""
    from flexgen.planner.costmodel import _step_seconds

    L = 2
    # (count, cache/activation loads, compute + synchronous stores, store-stream writes)
    own = {"embed": [(1, 0.0, 1.0, 0.0)], "attn": [(L, 0.0, 10.0, 0.0)], "mlp": [(L, 0.0, 1.0, 0.0)],
           "head": [(1, 0.0, 1.0, 0.0)]}
    load = {"embed": (2.0, 0.0), "attn": (3.0, 0.0), "mlp": (8.0, 0.0), "head": (2.0, 0.0)}
    # embed first; embed | attn weights; attn | mlp weights (x2); mlp | attn weights; mlp | head weights; head
    assert _step_seconds(own, load, 1, L, overlap=True) == 2 + 3 + 2 * 10 + 3 + 2 + 1
    # row over 3 GPU batches: every load three times, the head's batches load the next embedding
    assert _step_seconds(own, load, 3, L, overlap=True) == 2 + 9 + 2 * 24 + 9 + 6 + 4
    # without overlap everything adds up
    assert _step_seconds(own, load, 1, L, overlap=False) == (2 + 2 * 3 + 2 * 8 + 2) + (1 + 2 * 10 + 2 * 1 + 1)
    # decompression of the next layer's weights runs on the GPU beside the current layer's compute
    compressed = {**load, "mlp": (8.0, 5.0)}
    assert _step_seconds(own, compressed, 1, L, overlap=True) == 2 + 3 + 2 * 15 + 3 + 2 + 1
    # cache writes on the store stream are a resource of their own
    slow_stores = {**own, "head": [(1, 0.0, 1.0, 7.0)]}
    assert _step_seconds(slow_stores, load, 1, L, overlap=True) == 2 + 3 + 2 * 10 + 3 + 2 + 7
