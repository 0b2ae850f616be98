"""``flexgen bench``: runs on CPU, prints its figures beside the bound, compares with HF.

No timing is asserted anywhere: the machine running the tests is shared and its speed is not
ours to promise. What is checked is that the figures exist and are consistent (the bound is the
cost model's, the HF baseline generates on the very same weights), and that mistakes are one
line.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from flexgen import cli
from flexgen.bench.measure import BenchReport, format_report, hf_device_map, hf_model, run_bench
from flexgen.cli.bench import bench_command
from flexgen.config import load_config
from flexgen.models.opt import spec_for_size
from flexgen.policy import Policy

REPO = Path(__file__).resolve().parents[1]

# A profile for the bound, so tests do not measure the machine (except the one that does).
CPU_PROFILE = """\
base: t4-paper
name: test-cpu
device: cpu
shared_memory: true
gpu_memory: 8GiB
cpu_memory: 8GiB
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Cache and offload folders of this test only; a hardware file; a config on a tiny checkpoint."""
    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path / "cache"))
    hardware = tmp_path / "cpu.yaml"
    hardware.write_text(CPU_PROFILE)
    return tmp_path, hardware


def tiny_config(tmp_path: Path, checkpoint: Path, **policy) -> Path:
    """A bench config on the tiny HF checkpoint of conftest, float32 on the CPU."""
    values = dict(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=100, weights_cpu=0, cache_gpu=100, cache_cpu=0,
                  pin_weights=False)
    values.update(policy)
    lines = "\n".join(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())
    path = tmp_path / "bench.yaml"
    path.write_text(
        f"model:\n  path: {checkpoint}\n  dtype: float32\npolicy:\n{lines}\n"
        "data:\n  num_prompts: 5\n  prompt_len: 6\ngeneration:\n  max_new_tokens: 4\n"
        f"trainer:\n  accelerator: cpu\noutput:\n  offload_dir: {tmp_path / 'offload'}\n"
    )
    return path


def _figures(out: str) -> dict[str, list[str]]:
    rows = {}
    for kind in ("prefill", "decode", "total"):
        match = re.search(rf"^  {kind}\s+(\S+)\s+(\S+)\s+(\S+ %|-)", out, re.M)
        assert match, f"no {kind} row in:\n{out}"
        rows[kind] = list(match.groups())
    return rows


def test_bench_prints_measured_bound_and_percentage(env, tiny_checkpoint, capsys):
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = _figures(out)
    for kind, (measured, bound, reached) in rows.items():
        assert float(measured.replace(",", "")) > 0
        assert float(bound.replace(",", "")) > 0
        assert reached.endswith("%")
    assert "test-cpu" in out and "5 prompts x 6 tokens, 4 new tokens" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine_stats"]["generated_tokens"] == 5 * 4
    assert report["engine_stats"]["prompt_tokens"] == 5 * 6
    assert report["reached_percent"]["total"] == pytest.approx(100 * report["measured"]["total"] / report["bound"]["total"])


def test_bound_is_the_cost_models(env, tiny_checkpoint):
    """The bench's total bound is costmodel.estimate's bound_throughput for the same inputs."""
    from flexgen.planner.costmodel import Workload, estimate
    from flexgen.planner.hardware import load_hardware
    from flexgen.models.opt import OPTSpec

    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=100)
    cfg = load_config(config, [])
    report = run_bench(cfg, hardware=str(hardware), bound_only=True)
    assert report.measured is None
    spec = OPTSpec.from_hf_config(json.loads((tiny_checkpoint[0] / "config.json").read_text()))
    est = estimate(spec, cfg.to_policy(), Workload(6, 4, 5), load_hardware(hardware), dtype="float32")
    assert report.bound.total == pytest.approx(est.bound_throughput)
    blocks = est.num_blocks
    assert report.bound.prefill == pytest.approx(blocks * 4 * 6 / (blocks * est.prefill.bound_s))
    assert report.bound.decode == pytest.approx(blocks * 4 * 3 / (blocks * est.decode.bound_s))


def test_baseline_hf_on_cpu_prints_the_ratio_and_matches_outputs(env, tiny_checkpoint, capsys):
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--baseline", "hf"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"baseline hf: (\S+) tokens/s total \(batch 2, .*flexgen / hf = (\S+)x; identical outputs for (\d+)/5", out)
    assert match, out
    assert float(match.group(1).replace(",", "")) > 0 and float(match.group(2)) > 0
    # float32 on the CPU, the same weights: greedy tokens equal HF's for every prompt
    assert match.group(3) == "5"


def test_weights_off_the_gpu_on_cpu_need_no_accelerate(env, tiny_checkpoint, capsys):
    """On a CPU engine, cpu-tier weights are the same memory: the HF baseline runs as built."""
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=100, num_gpu_batches=1)
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--baseline", "hf",
                          "--baseline-batch-size", "3", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "batch 3, all weights on cpu" in out and "identical outputs for 5/5" in out


def test_baseline_on_some_prompts_and_repeats(env, tiny_checkpoint, capsys):
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--baseline", "hf",
                          "--baseline-prompts", "2", "--repeat", "2", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "identical outputs for 2/2 prompts" in out and "medians of 2 runs" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["baseline"]["generated_tokens"] == 2 * 4
    assert report["engine_stats"]["generated_tokens"] == 5 * 4  # the best of the repeats, not their sum
    assert len(report["runs_total"]) == len(report["baseline"]["runs_total"]) == 2
    assert report["measured"]["total"] == max(report["runs_total"])
    assert report["baseline"]["ratio_of_medians"] > 0


def test_peak_rss_anon_sees_an_allocation():
    """The sampler keeps the largest RssAnon: a 64 MB tensor held for a while shows in it."""
    from flexgen.bench.measure import PeakRssAnon

    if PeakRssAnon.read() is None:
        pytest.skip("no /proc/self/status here")
    before = PeakRssAnon.read()
    with PeakRssAnon(interval_s=0.001) as rss:
        block = torch.ones(16 << 20)  # 64 MB, every page written
        time.sleep(0.05)
        del block
    assert rss.peak >= before + (48 << 20)


def test_synthetic_model_with_measured_profile_cached(tmp_path, monkeypatch, capsys):
    """A synthetic OPT size end to end, with this machine's profile measured once and cached."""
    from flexgen.planner.hardware import measure_hardware

    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path / "cache"))
    measure_hardware("cpu", quick=True)  # what the bench would measure, made quick for the test
    cached = list((tmp_path / "cache").glob("hardware-cpu-*.json"))
    assert len(cached) == 1
    config = REPO / "configs" / "bench" / "cpu-opt-125m.yaml"
    args = ["--config", str(config), "data.num_prompts=2", "data.prompt_len=4", "generation.max_new_tokens=2",
            "policy.gpu_batch_size=2", f"output.offload_dir={tmp_path / 'offload'}", "--no-warmup"]
    assert bench_command(args) == 0
    out = capsys.readouterr().out
    assert "opt-125m (synthetic, seed 0), float32, on cpu; 2 prompts x 4 tokens" in out
    assert "measured on" in out
    _figures(out)
    assert list((tmp_path / "cache").glob("hardware-cpu-*.json")) == cached


def test_hf_model_holds_the_engines_synthetic_weights():
    """The baseline's weights are the engine's: the same seeded tensors, lm_head untied."""
    from flexgen.models import opt
    from flexgen.models.checkpoint import SyntheticWeights

    spec = spec_for_size("opt-125m")
    model = hf_model("opt-125m", spec, "float32", seed=3)
    source = SyntheticWeights(spec, seed=3, dtype=torch.float32)
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    for index in (0, 1, 4, spec.num_model_layers - 1):
        for w in opt.layer_weights(spec, index):
            key = w.name if w.name == "lm_head.weight" else f"model.decoder.{w.name}"
            assert torch.equal(state[key], source.get(w)), key
    assert not torch.equal(state["lm_head.weight"], state["model.decoder.embed_tokens.weight"])


@pytest.mark.parametrize("weights,expected", [((100, 0), {"cuda:0"}), ((0, 100), {"cpu"}), ((0, 0), {"disk"})])
def test_hf_device_map_follows_the_policy(weights, expected):
    from transformers import OPTConfig, OPTForCausalLM

    spec = spec_for_size("opt-1.3b")
    device_map = hf_device_map(spec, Policy(weights_gpu=weights[0], weights_cpu=weights[1]), "cuda")
    assert set(device_map.values()) == expected
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(**{**spec.to_hf_config(), "tie_word_embeddings": False}))
    modules = dict(model.named_modules())
    assert all(name in modules for name in device_map)
    # every parameter is covered by exactly one entry
    for name, _ in model.named_parameters():
        owners = [m for m in device_map if name.startswith(m + ".")]
        assert len(owners) == 1, name


def test_hf_device_map_splits_in_model_order():
    spec = spec_for_size("opt-6.7b")
    device_map = hf_device_map(spec, Policy(weights_gpu=30, weights_cpu=30), "cuda:1")
    order = [device_map[f"model.decoder.layers.{i}"] for i in range(spec.num_layers)]
    assert order == sorted(order, key=["cuda:1", "cpu", "disk"].index)
    counts = {t: order.count(t) for t in set(order)}
    assert all(math.isclose(counts[t], 0.3 * 32, abs_tol=2) for t in ("cuda:1", "cpu"))


def test_disk_cache_warm_and_cold_price_disk_differently(env, tiny_checkpoint):
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=0)
    cfg = load_config(config, [])
    cold = run_bench(cfg, hardware=str(hardware), disk_cache="cold", bound_only=True)
    warm = run_bench(cfg, hardware=str(hardware), disk_cache="warm", bound_only=True)
    auto = run_bench(cfg, hardware=str(hardware), disk_cache="auto", bound_only=True)  # a tiny model fits: warm
    assert cold.disk_cache == "cold" and warm.disk_cache.startswith("warm")
    assert auto.hardware["disk_read_bandwidth"] == warm.hardware["disk_read_bandwidth"]
    assert warm.hardware["disk_read_bandwidth"] != cold.hardware["disk_read_bandwidth"]


def test_packed_weights_on_disk_say_how_many_bytes_a_pass_reads(env, tiny_checkpoint):
    """int4 weights on disk: the report says the packed bytes read per pass against the unpacked
    ones, and the bound's disk->cpu bytes are the packed ones; float32 weights get no such note."""
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=0)
    raw = run_bench(load_config(config, []), hardware=str(hardware), disk_cache="cold", bound_only=True)
    packed = run_bench(load_config(config, ["plugins.weight_compressor=int4"]), hardware=str(hardware),
                       disk_cache="cold", bound_only=True)
    assert not any("packed" in note for note in raw.notes)
    [note] = [note for note in packed.notes if "int4-packed" in note]
    assert "read per pass instead of" in note and "float32" in note
    assert packed.bound_bytes["disk->cpu"] < 0.5 * raw.bound_bytes["disk->cpu"]
    assert note in format_report(packed)


def test_disk_cache_auto_counts_the_bytes_the_disk_holds(env, tiny_checkpoint):
    """``auto`` asks the cost model what the disk tier holds: int4 weights (~0.1 MB here) fit in
    half of a 400 KiB memory, where the same weights in float32 (~0.6 MB) do not."""
    tmp_path, _ = env
    small = tmp_path / "small.yaml"
    small.write_text(CPU_PROFILE.replace("cpu_memory: 8GiB", "cpu_memory: 400KiB"))
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=0)
    raw = run_bench(load_config(config, []), hardware=str(small), bound_only=True)
    packed = run_bench(load_config(config, ["plugins.weight_compressor=int4"]), hardware=str(small), bound_only=True)
    assert raw.disk_cache.startswith("cold")
    assert packed.disk_cache.startswith("warm")


def test_weights_too_large_for_the_page_cache_are_priced_by_the_share_kept(env, tiny_checkpoint):
    """``auto`` with weights on disk that do not fit: the disk tier keeps ``page_cache_fraction`` of
    the memory's worth cached between steps, so the bound's disk rate lies between the cold and the
    warm ones, and says so; more kept, a faster rate; ``cold`` keeps the device's rate."""
    tmp_path, _ = env
    small = tmp_path / "small.yaml"
    small.write_text(CPU_PROFILE.replace("cpu_memory: 8GiB", "cpu_memory: 400KiB"))
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=0)
    cold = run_bench(load_config(config, []), hardware=str(small), disk_cache="cold", bound_only=True)
    warm = run_bench(load_config(config, []), hardware=str(small), disk_cache="warm", bound_only=True)
    auto = run_bench(load_config(config, []), hardware=str(small), bound_only=True)
    more = run_bench(load_config(config, ["plugins.storage.disk={name: disk, page_cache_fraction: 0.9}"]),
                     hardware=str(small), bound_only=True)
    rate = {name: r.hardware["disk_read_bandwidth"] for name, r in
            {"cold": cold, "warm": warm, "auto": auto, "more": more}.items()}
    assert rate["cold"] < rate["auto"] < rate["more"] < rate["warm"], rate
    assert cold.disk_cache == "cold" and auto.disk_cache.startswith("cold, ")
    [note] = [n for n in auto.notes if "stay in the page cache" in n]
    assert "60% of" in note and note in format_report(auto)


def test_workload_configs_load_and_have_bounds():
    """configs/bench/w*.yaml: valid configs whose bound the cost model prices for an H200."""
    configs = sorted((REPO / "configs" / "bench").glob("w*.yaml"))
    assert len(configs) == 5
    for path in configs:
        cfg = load_config(path, [])
        assert cfg.model.synthetic and cfg.data.num_prompts == cfg.to_policy().block_size
        report = run_bench(cfg, hardware="h200", bound_only=True)
        assert report.bound.total and report.bound.total > 0, path
        assert "note: the hardware profile 'h200' is for a cuda" in format_report(report) or torch.cuda.is_available()


def test_format_report_without_a_bound():
    report = BenchReport(
        model="m", dtype="float32", device="cpu", num_prompts=1, prompt_len=2, gen_len=3,
        policy=Policy().to_dict(), plugins={"attention": "mine"}, hardware=_hw_dict(), disk_cache="cold",
        bound_note="no bound: plugins.attention: the cost model prices gpu and cpu attention, not 'mine'",
    )
    text = format_report(report)
    assert "no bound: plugins.attention" in text and "  total" in text


def _hw_dict():
    from flexgen.planner.hardware import PRESETS

    return PRESETS["t4-paper"].to_dict()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--baseline", "vllm"], "argument --baseline: invalid choice"),
        (["policy.gpu_batchsize=2"], "unknown config key 'policy.gpu_batchsize'"),
        (["model.synthetic=opt-7b", "model.path=null"], "model.synthetic: unknown model size"),
        (["--baseline-batch-size", "0"], "--baseline-batch-size must be >= 1"),
        (["--baseline-prompts", "-1"], "--baseline-prompts must be >= 1"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--disk-cache", "hot"], "argument --disk-cache: invalid choice"),
        (["--hardware", "/nonexistent/hw.yaml"], "hardware file '/nonexistent/hw.yaml' not found"),
        (["--json", "/nonexistent/dir/r.json"], "--json: folder /nonexistent/dir does not exist"),
        (["generation.max_new_tokens=100000"], "exceed the model's"),
    ],
)
def test_bad_input_is_one_line(env, tiny_checkpoint, capsys, args, message):
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    status = cli.main(["bench", "--config", str(config), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("flexgen bench: error: "), err
    assert message in err


def test_missing_config_is_one_line(capsys):
    assert cli.main(["bench", "--config", "/nonexistent.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "flexgen bench: error: config file /nonexistent.yaml not found"


def test_unpriced_plugin_gives_a_note_not_a_crash(env, tiny_checkpoint):
    """A third-party attention backend the cost model cannot price: figures without a bound."""
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    report = run_bench(load_config(config, ["plugins.attention=mystery"]), hardware=str(hardware), bound_only=True)
    assert report.bound.total is None
    assert "no bound: plugins.attention" in format_report(report)


def test_bytes_moved_printed_beside_the_cost_models(env, tiny_checkpoint, capsys):
    """Weights on disk: the engine's disk reads and the cost model's are printed side by side, and agree."""
    tmp_path, hardware = env
    config = tiny_config(tmp_path, tiny_checkpoint[0], weights_gpu=0, weights_cpu=0)
    assert bench_command(["--config", str(config), "--hardware", str(hardware), "--no-warmup"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"bytes moved, measured \| cost model: disk->cpu (\S+ [GT]B) \| (\S+ [GT]B)", out)
    assert match, out
    assert match.group(1) == match.group(2)
    assert "peak memory, measured | cost model: gpu" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_asked_without_cuda_is_one_line(env, tiny_checkpoint, capsys):
    tmp_path, _ = env
    config = tiny_config(tmp_path, tiny_checkpoint[0])
    assert cli.main(["bench", "--config", str(config), "trainer.accelerator=gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is available" in err
