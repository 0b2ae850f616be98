"""``flexgen bench --config FILE [key=value ...] [--baseline hf]``: throughput beside its bound.

A bench run is a predict run stripped to what a measurement needs: the model (usually
``model.synthetic``: seeded random weights of any OPT size, no download), the prompts (usually
``data.num_prompts`` synthetic prompts of ``data.prompt_len`` tokens), the policy and plugins,
all read by :func:`flexgen.config.load_config` exactly as ``flexgen predict`` reads them. It

1. resolves the machine's :class:`~flexgen.planner.hardware.HardwareProfile` (measured once and cached
   by :func:`flexgen.planner.hardware.measure_hardware`; ``--hardware h200`` or a YAML file instead);
2. asks the cost model (:func:`flexgen.planner.costmodel.estimate`) for the *bound* of this policy on
   this machine: per phase, the busiest single resource (a link's bytes ÷ its bandwidth, or a
   processor's FLOPs ÷ its rate), which no schedule can beat;
3. loads the engine, runs one short warm-up generate (the first block, each prompt cut to its
   first 16 tokens, 2 new tokens: CUDA context, cuBLAS handles, the page cache of disk-tier
   weights, at a small fraction of a real prefill's cost), then generates for every prompt and
   reads ``engine.stats``;
4. with ``--baseline hf``, runs HF transformers' ``generate`` on the very same weights and
   prompts (with Accelerate offloading when the policy keeps weights off the GPU) and prints
   the ratio.

Definitions (the same for "measured" and "bound", so the percentage compares like with like):

* prefill: prompt tokens ÷ prefill seconds;
* decode: tokens generated *after* the first one of each prompt ÷ decode seconds (the first
  token comes out of the prefill step), i.e. the cost model's ``decode_throughput``;
* total: FlexGen's definition, every generated token ÷ (prefill + decode seconds).

Every sequence runs the full ``generation.max_new_tokens`` (``generation.stop`` is ignored),
because the bound assumes it. Nothing here asserts a speed: a bench prints figures.

Disk-tier weights after the warm-up are usually in the OS page cache (the workloads of
docs/benchmarks.md say "page cache warm"); the hardware profile's disk read rate is a cold
read (``posix_fadvise(DONTNEED)`` first). ``--disk-cache`` chooses which one the bound uses;
``auto`` assumes warm when the disk-tier bytes fit in half the machine's memory, and the
warm rate is measured here by reading a file twice (or, for a preset/file profile, taken as
the read side of a host memory copy, half of ``cpu_memory_bandwidth``). When ``auto`` finds
that they do not fit, the disk tier still keeps a share of them in the page cache between steps
(flexgen/storage/disk.py), and the bound prices those bytes at the warm rate, the rest at the
disk's; ``cold`` prices every byte at the disk's rate (a page cache that keeps nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen.config import FlexGenConfig, resolve_offload_dir
from flexgen.dtypes import compute_dtype
from flexgen.errors import ConfigError, FlexGenError
from flexgen.planner.hardware import HardwareProfile

BASELINES = ("hf",)
WARMUP_PROMPT_LEN = 16  # the warm-up's prompts: long enough for every kernel, short enough to cost little
DISK_CACHE_MODES = ("auto", "warm", "cold")


# --------------------------------------------------------------------------- results


@dataclass
class Rates:
    """Throughput of one run (or its bound), tokens per second."""

    prefill: float | None = None
    decode: float | None = None
    total: float | None = None


@dataclass
class BenchReport:
    """Everything a bench run found; printed by :func:`format_report`."""

    model: str
    dtype: str
    device: str
    num_prompts: int
    prompt_len: int
    gen_len: int
    policy: dict[str, Any]
    plugins: dict[str, Any]
    hardware: dict[str, Any]
    disk_cache: str
    #: the dtype the products run in (the model's, except half precision on a CPU without native
    #: support); None: the model's
    compute_dtype: str | None = None
    bound: Rates = field(default_factory=Rates)
    bound_bottleneck: dict[str, str] = field(default_factory=dict)
    bound_note: str | None = None
    predicted_total: float | None = None
    #: the cost model's bytes per link over the whole run, and peak bytes per tier
    bound_bytes: dict[str, float] = field(default_factory=dict)
    bound_peak: dict[str, float] = field(default_factory=dict)
    measured: Rates | None = None
    #: seconds load_engine took: placing (synthetic weights: making) every weight in its tier
    load_time_s: float | None = None
    engine_stats: dict[str, Any] | None = None
    #: the engine's intra-op thread setting (:meth:`flexgen.threads.ThreadChoice.to_dict`); the HF
    #: baseline runs with the same number of threads
    threads: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    #: total tokens/s of every measured run (``--repeat``), in order; ``measured`` is the fastest
    runs_total: list[float] = field(default_factory=list)
    #: the largest anonymous resident memory (RssAnon: heap, not the page cache) of this process
    #: while the engine loaded and generated, sampled every few ms; None off Linux
    peak_rss_anon: int | None = None
    notes: list[str] = field(default_factory=list)

    def median_total(self) -> float | None:
        """The median of the runs' total throughput (steadier than the fastest on a shared machine)."""
        return statistics.median(self.runs_total) if self.runs_total else None

    def reached(self, kind: str) -> float | None:
        """Measured ÷ bound in percent, or None when either is missing."""
        bound = getattr(self.bound, kind)
        measured = getattr(self.measured, kind) if self.measured else None
        if not bound or measured is None or not math.isfinite(bound):
            return None
        return 100.0 * measured / bound

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reached_percent"] = {k: self.reached(k) for k in ("prefill", "decode", "total")}
        return out


# --------------------------------------------------------------------------- the run


def run_bench(
    cfg: FlexGenConfig,
    baseline: str | None = None,
    baseline_batch_size: int | None = None,
    baseline_prompts: int | None = None,
    hardware: str | None = None,
    refresh_hardware: bool = False,
    disk_cache: str = "auto",
    bound_only: bool = False,
    warmup: bool = True,
    repeat: int = 1,
    progress=None,
    on_figures=None,
) -> BenchReport:
    """Measure (unless ``bound_only``) and bound one config; see the module docstring.

    ``on_figures(report)`` is called each time the report gains figures (the bound, the
    engine's measurement), before the next, longer part of the run.
    """
    from flexgen.predict.data import load_prompts
    from flexgen.predict.resolve import load_tokenizer, resolve_model, resolve_policy

    say = progress or (lambda line: None)
    device = _bench_device(cfg)
    cfg.resolve_dtype(device)
    model, model_dir, spec = resolve_model(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    prompts = load_prompts(cfg, tokenizer, spec)
    policy, plugins, _ = resolve_policy(cfg, spec, prompts)
    offload_dir = resolve_offload_dir(cfg)
    prompt_len = max(len(p.input_ids) for p in prompts)
    gen_len = cfg.generation.max_new_tokens

    profile = _hardware_profile(hardware, device, refresh_hardware, offload_dir, say)
    report = BenchReport(
        model=spec.name if cfg.model.synthetic is None else f"{cfg.model.synthetic} (synthetic, seed {cfg.model.seed})",
        dtype=cfg.model.dtype, device=device, compute_dtype=compute_dtype(cfg.model.dtype, device),
        num_prompts=len(prompts), prompt_len=prompt_len, gen_len=gen_len,
        policy=policy.to_dict(), plugins=plugins, hardware=profile.to_dict(), disk_cache="cold",
    )
    if (profile.device == "cuda") != device.startswith("cuda"):
        report.notes.append(
            f"the hardware profile {profile.name!r} is for a {profile.device} compute device but the engine runs on "
            f"{device}: the bound describes that other machine"
        )
    _bound(report, cfg, spec, policy, plugins, profile, disk_cache, offload_dir, hardware is None)
    figures = on_figures or (lambda report: None)
    if bound_only:
        return report
    figures(report)

    ids = [list(p.input_ids) for p in prompts]
    kwargs = _generation_kwargs(cfg)
    say(f"flexgen bench: loading {report.model} into the engine ...")
    engine_tokens = _run_engine(report, cfg, model, policy, plugins, device, offload_dir, ids, kwargs, warmup, repeat, say)
    if baseline == "hf":
        figures(report)
        batch = baseline_batch_size or policy.gpu_batch_size
        hf_ids = ids[:baseline_prompts] if baseline_prompts else ids
        say(f"flexgen bench: running HF transformers on the same weights, {len(hf_ids)} prompts, batch {batch} ...")
        threads = report.threads["threads"] if report.threads else None
        with _torch_threads(threads):
            report.baseline = run_hf_baseline(
                model, spec, cfg.model.dtype, cfg.model.seed, policy, device, offload_dir, hf_ids, kwargs, batch, warmup,
                repeat,
            )
        report.baseline["threads"] = threads
        hf_tokens = report.baseline.pop("tokens")
        same = sum(a == b for a, b in zip(engine_tokens, hf_tokens))
        report.baseline["identical_outputs"] = same
        report.baseline["num_prompts"] = len(hf_ids)
        total = report.measured.total if report.measured else None
        hf_total = report.baseline["total_throughput"]
        report.baseline["ratio"] = total / hf_total if total and hf_total else None
        ours, theirs = report.median_total(), statistics.median(report.baseline["runs_total"])
        report.baseline["ratio_of_medians"] = ours / theirs if ours and theirs else None
    return report


class PeakRssAnon:
    """Samples this process's RssAnon (``/proc/self/status``) on a thread and keeps the largest.

    RssAnon is the memory the process itself holds (heap, tensors), not the page cache that
    disk reads fill, which the kernel gives back under pressure: the figure that says whether
    a model larger than RAM really streams. ``peak`` is None where the file does not exist.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexgen-rss", daemon=True)

    @staticmethod
    def read() -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while True:
            value = self.read()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakRssAnon":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """Run the baseline with the engine's intra-op threads (None: as they are), so both sides compute alike."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bench_device(cfg: FlexGenConfig) -> str:
    """The one compute device of a bench run, from ``trainer.accelerator`` (and ``trainer.devices``).

    A bench measures one engine in one process: the accelerator is predict's
    (:func:`flexgen.predict.resolve.resolve_accelerator`: ``auto`` is CUDA when present, and a GPU
    asked for without CUDA is a one-line error); a GPU takes the first index of
    ``trainer.devices`` when it is a list.
    """
    from flexgen.predict.resolve import resolve_accelerator

    accelerator, devices = resolve_accelerator(cfg)
    if accelerator == "cpu":
        return "cpu"
    index = int(devices[0]) if isinstance(devices, (list, tuple)) and devices else 0
    return f"cuda:{index}"


def _generation_kwargs(cfg: FlexGenConfig) -> dict[str, Any]:
    """Engine.generate's keywords; no stop token, so every sequence runs the full length the bound assumes."""
    kwargs = cfg.generation_kwargs()
    kwargs["stop"] = kwargs["stop_strings"] = None
    return kwargs


def _hardware_profile(hardware: str | None, device: str, refresh: bool, offload_dir: str | None, say):
    """``--hardware``'s profile, or this machine's: measured once (disk probe in the offload folder), then cached."""
    from flexgen.planner.hardware import get_hardware, measure_hardware

    if hardware is not None:
        return get_hardware(hardware)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if refresh:
        say("flexgen bench: measuring this machine's hardware profile (a few seconds, cached) ...")
    return measure_hardware(kind, disk_dir=offload_dir, refresh=refresh)


def _bound(report, cfg, spec, policy, plugins, profile, disk_cache, offload_dir, measured_here: bool) -> None:
    """Fill ``report.bound`` from the cost model; a note instead when it cannot price the config."""
    from flexgen.planner.costmodel import Workload, estimate, estimate_options
    from flexgen.planner.page_cache import page_cache_fraction

    if report.compute_dtype not in (None, report.dtype):
        # Half precision computed in float32 (a CPU without native support): its products run at
        # the float32 rate, which the profile states under the model's dtype for the cost model.
        key = {"float16": "gpu_flops_fp16", "bfloat16": "gpu_flops_bf16"}[report.dtype]
        profile = dataclasses.replace(profile, **{key: profile.gpu_flops(report.compute_dtype)})
        report.notes.append(f"{report.dtype} is computed in {report.compute_dtype} on this CPU; the bound "
                            f"prices its products at the {report.compute_dtype} rate")
    try:
        options = estimate_options(plugins)
        workload = Workload(report.prompt_len, report.gen_len, report.num_prompts)
        if policy.percents("weights")["disk"] > 0 or policy.percents("cache")["disk"] > 0:
            # what the disk tier holds, exactly (whole tensors, compressed bytes), as the model places it
            on_disk = estimate(spec, policy, workload, profile, dtype=cfg.model.dtype, memory_only=True,
                               **options).memory["disk"]
            _note_packed_disk_weights(report, spec, policy, workload, profile, cfg.model.dtype, plugins, on_disk)
            if _disk_is_warm(disk_cache, on_disk, profile.cpu_memory):
                rate, how = _warm_read_rate(profile, offload_dir, measured_here)
                profile = dataclasses.replace(profile, disk_read_bandwidth=rate)
                report.hardware = profile.to_dict()
                report.disk_cache = f"warm: {how}"
                report.notes.append(
                    f"disk reads priced at {rate / 1e9:.1f} GB/s, the page cache's rate ({how}); --disk-cache cold for the device's"
                )
            elif disk_cache == "auto" and on_disk["cache"] == 0 and on_disk["weights"] > 0:
                profile = _price_kept_weights(report, profile, on_disk["weights"], page_cache_fraction(plugins),
                                              offload_dir, measured_here)
        est = estimate(spec, policy, workload, profile, dtype=cfg.model.dtype, **options)
    except FlexGenError as exc:
        report.bound_note = f"no bound: {exc}"
        return
    blocks = est.num_blocks
    block = policy.block_size
    prefill_s, decode_s = blocks * est.prefill.bound_s, blocks * est.decode.bound_s
    report.bound = Rates(
        prefill=blocks * block * report.prompt_len / prefill_s if prefill_s > 0 else None,
        decode=blocks * block * (report.gen_len - 1) / decode_s if decode_s > 0 else None,
        total=est.bound_throughput,
    )
    report.bound_bottleneck = {"prefill": est.prefill.bottleneck, "decode": est.decode.bottleneck if decode_s > 0 else "-"}
    report.predicted_total = est.predicted_throughput
    report.bound_bytes = {link: blocks * (est.prefill.bytes[link] + est.decode.bytes[link]) for link in est.prefill.bytes}
    report.bound_peak = {tier: est.peak(tier) for tier in ("gpu", "cpu", "disk")}
    for tier in ("gpu", "cpu", "disk"):
        need, have = est.peak(tier), getattr(profile, f"{tier}_memory")
        if need > have:
            report.notes.append(
                f"the cost model puts the {tier} peak at {need / 2**30:.1f} GiB, more than the profile's "
                f"{have / 2**30:.1f} GiB: the run may not fit"
            )


def _note_packed_disk_weights(report, spec, policy, workload, profile, dtype: str, plugins: dict[str, Any],
                               on_disk: dict[str, float]) -> None:
    """With compressed weights on disk, say how many bytes a pass reads, packed against unpacked:
    the bound counts the packed bytes, which is where a compressor pays on a disk-bound run."""
    from flexgen import registry
    from flexgen.planner.costmodel import estimate, estimate_options

    name, _ = registry.parse_spec(plugins.get("weight_compressor") or "none", "plugins.weight_compressor")
    if name == "none" or not on_disk.get("weights"):
        return
    unpacked = estimate(spec, policy, workload, profile, dtype=dtype, memory_only=True,
                        **estimate_options({**plugins, "weight_compressor": "none"})).memory["disk"]["weights"]
    report.notes.append(
        f"weights on disk are {name}-packed: {on_disk['weights'] / 1e9:.3g} GB read per pass instead of "
        f"{unpacked / 1e9:.3g} GB in {dtype} ({on_disk['weights'] / unpacked:.0%}); the bound counts the packed bytes"
    )


def _price_kept_weights(report, profile, weights_on_disk: float, fraction: float, offload_dir: str | None,
                        measured_here: bool):
    """The profile with the disk read rate of a run whose weights on disk do not fit in the page
    cache, so that the disk tier keeps a share of them cached between steps
    (:class:`flexgen.storage.disk.DiskStorage`): those bytes are priced at the page cache's rate,
    the others at the disk's.

    The share kept is ``fraction`` of the memory available now (of the profile's memory for a
    preset or file profile). The first pass reads every byte from the disk, so the bound is an
    upper bound on a run that starts cold.
    """
    from flexgen.planner.page_cache import kept_weight_bytes

    kept, memory = kept_weight_bytes(weights_on_disk, fraction, None if measured_here else profile.cpu_memory)
    if kept <= 0:
        return profile
    warm, how = _warm_read_rate(profile, offload_dir, measured_here)
    cold = profile.disk_read_bandwidth
    rate = weights_on_disk / (kept / warm + (weights_on_disk - kept) / cold)
    report.notes.append(
        f"{kept / 1e9:.3g} GB of the {weights_on_disk / 1e9:.3g} GB of weights on disk stay in the page cache between "
        f"steps ({fraction:.0%} of {memory / 1e9:.3g} GB available): disk reads priced at "
        f"{rate / 1e9:.2f} GB/s, those bytes at the page cache's {warm / 1e9:.1f} GB/s ({how}), the rest at the disk's"
    )
    profile = dataclasses.replace(profile, disk_read_bandwidth=rate)
    report.hardware = profile.to_dict()
    report.disk_cache = f"cold, {kept / 1e9:.3g} GB kept in the page cache"
    return profile


def _disk_is_warm(mode: str, on_disk: dict[str, float], memory: int) -> bool:
    """Whether disk-tier reads come from the page cache: no cache on disk (written every step),
    and the weights on disk (``on_disk``: the cost model's bytes per kind) fit in half of ``memory``."""
    if mode != "auto":
        return mode == "warm"
    return on_disk["cache"] == 0 and on_disk["weights"] <= memory / 2


def _warm_read_rate(profile, offload_dir: str | None, measured_here: bool) -> tuple[float, str]:
    """Bytes per second of reading a file that is in the page cache: measured here, or from the profile.

    Measured with one reader thread per core (up to 8) on disjoint ranges, since a bound is
    what the machine can do, not what one thread of the engine does today.
    """
    if not measured_here:
        return profile.cpu_memory_bandwidth / 2, "half the profile's host memory copy rate"
    from concurrent.futures import ThreadPoolExecutor

    from flexgen.paths import cache_root

    directory = Path(offload_dir) if offload_dir else cache_root()
    directory.mkdir(parents=True, exist_ok=True)
    threads = max(1, min(8, os.cpu_count() or 1))
    chunk = 16 << 20
    size = chunk * max(8, 32 // threads) * threads  # 512 MiB to 1 GiB
    handle, name = tempfile.mkstemp(prefix="flexgen-warm-read-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as f:
            block = os.urandom(chunk)
            for _ in range(size // chunk):
                f.write(block)
        fd = os.open(name, os.O_RDONLY)
        share = size // threads

        def read(index: int) -> None:
            buffer = bytearray(chunk)
            for offset in range(index * share, (index + 1) * share, chunk):
                os.preadv(fd, [buffer], offset)

        best = float("inf")
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for _ in range(3):  # the first pass may still fault pages in; keep the fastest
                    start = time.perf_counter()
                    list(pool.map(read, range(threads)))
                    best = min(best, time.perf_counter() - start)
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
    return size / best, f"measured here, {threads} reader threads"


def _run_engine(report, cfg, model, policy, plugins, device, offload_dir, ids, kwargs, warmup, repeat, say) -> list[list[int]]:
    """Load the engine, warm it up, generate for every prompt ``repeat`` times; the fastest fills
    ``report.measured``, every run's total goes to ``report.runs_total``, the peak RssAnon to
    ``report.peak_rss_anon``."""
    with PeakRssAnon() as rss:
        tokens = _generate_in_engine(report, cfg, model, policy, plugins, device, offload_dir, ids, kwargs, warmup,
                                     repeat, say)
    report.peak_rss_anon = rss.peak
    return tokens


def _generate_in_engine(report, cfg, model, policy, plugins, device, offload_dir, ids, kwargs, warmup, repeat, say):
    from flexgen.engine import load_engine

    started = time.perf_counter()
    engine = load_engine(
        model, policy=policy, plugins=plugins, device=device, offload_dir=offload_dir,
        dtype=cfg.model.dtype, seed=cfg.model.seed, threads=cfg.threads(),
    )
    report.load_time_s = time.perf_counter() - started
    say(f"flexgen bench: engine loaded in {report.load_time_s:.1f} s")
    try:
        if warmup:
            say("flexgen bench: warm-up ...")
            engine.generate([p[:WARMUP_PROMPT_LEN] for p in ids[: policy.block_size]],
                            **{**kwargs, "max_new_tokens": min(2, kwargs["max_new_tokens"])})
        stats = None
        for _ in range(repeat):
            engine.stats.reset()
            say(f"flexgen bench: generating {len(ids)} x {kwargs['max_new_tokens']} tokens ...")
            tokens = engine.generate(ids, **kwargs)
            run = engine.stats.to_dict()
            report.runs_total.append(run["total_throughput"])
            if stats is None or run["total_throughput"] > stats["total_throughput"]:
                stats = run
    finally:
        engine.close()
        del engine
        gc.collect()
        _empty_cuda_cache()
    decode_tokens = stats["generated_tokens"] - len(ids)
    report.measured = Rates(
        prefill=stats["prefill_throughput"],
        decode=decode_tokens / stats["decode_time_s"] if stats["decode_time_s"] > 0 else None,
        total=stats["total_throughput"],
    )
    report.engine_stats = stats
    report.threads = stats.get("threads")
    return tokens


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- HF baseline


def hf_model(model: str, spec, dtype: str, seed: int, device: str | None = None):
    """The HF ``*ForCausalLM`` of the spec's family holding exactly the weights the engine loads, without a second copy.

    The HF class comes from the family: the spec's ``to_hf_config()`` names its ``model_type``,
    which transformers' Auto classes map to ``OPTForCausalLM``, ``LlamaForCausalLM``, ... The
    module is created on the meta device and every parameter is *assigned* the tensor of the
    engine's weight source (:func:`flexgen.models.checkpoint.open_source`: seeded synthetic
    weights, or the checkpoint's tensors) under the family's checkpoint name, so memory holds
    one copy; with ``device`` each tensor is made there (synthetic weights are cut from their
    seed's table on that device, at its memory speed), so host memory never holds the model.
    The output embedding is untied: synthetic weights draw ``lm_head.weight`` separately, as
    the engine does. Buffers a module computes from the config (rotary frequencies) are built
    afresh, since the meta device holds no values.
    """
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexgen.engine import DTYPES
    from flexgen.models.checkpoint import open_source
    from flexgen.models.families import family_for_spec

    family = family_for_spec(spec)
    torch_dtype = DTYPES[dtype]
    values = {**spec.to_hf_config(), "tie_word_embeddings": False}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.dtype = torch_dtype
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config)
    source = open_source(model, dtype=torch_dtype, seed=seed)
    weights = [w for index in range(spec.num_model_layers) for w in family.layer_weights(spec, index)]

    def load(weight) -> torch.Tensor:
        return source.get(weight, device=device or "cpu").to(torch_dtype)

    state = {}
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for weight, tensor in zip(weights, pool.map(load, weights)):
            state[family.checkpoint_names(spec, weight)[0]] = tensor
    module.load_state_dict(state, strict=True, assign=True)
    for name, sub in list(module.named_modules()):
        if any(buffer.is_meta for buffer in sub.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, type(sub)(config).to(device or "cpu"))
    # Every sequence runs the full length, as the engine's do in the bench: no end-of-sequence
    # (min_new_tokens would instead forbid that token, and the outputs would differ).
    module.generation_config.eos_token_id = None
    return module.eval()


def hf_device_map(spec, policy, device: str) -> dict[str, Any]:
    """Accelerate's ``device_map`` cutting HF's modules over gpu / cpu / disk like the policy's weights.

    Modules in model order (embeddings, decoder layers, final norm and head) are cut by size
    with the very rule the engine uses (:func:`flexgen.policy.split_by_percent`).
    """
    from flexgen.models.families import family_for_spec
    from flexgen.policy import split_by_percent

    family = family_for_spec(spec)

    def module_of(weight) -> str:
        """The HF module holding ``weight``: its checkpoint name without the parameter's own name."""
        return family.checkpoint_names(spec, weight)[0].rsplit(".", 1)[0]

    def size(index: int) -> int:
        return sum(math.prod(w.shape) for w in family.layer_weights(spec, index))

    sizes: dict[str, int] = {}  # module -> parameters, in model order
    for w in family.layer_weights(spec, 0):
        sizes[module_of(w)] = sizes.get(module_of(w), 0) + math.prod(w.shape)
    layer_prefix = module_of(family.layer_weights(spec, 1)[0]).split(".layers.")[0] + ".layers"
    for i in range(spec.num_layers):
        sizes[f"{layer_prefix}.{i}"] = size(2 * i + 1) + size(2 * i + 2)
    for w in family.layer_weights(spec, spec.num_model_layers - 1):
        sizes[module_of(w)] = sizes.get(module_of(w), 0) + math.prod(w.shape)
    modules = list(sizes.items())
    tiers = split_by_percent([s for _, s in modules], policy.percents("weights"))
    target = {"gpu": device if device != "cuda" else "cuda:0", "cpu": "cpu", "disk": "disk"}
    return {name: target[tier] for (name, _), tier in zip(modules, tiers)}


def hf_placed_model(model, spec, dtype: str, seed: int, policy, device: str, offload_dir: str | None):
    """HF's model on the same weights, placed as the baseline places it: ``(module, placement)``.

    On a CUDA engine, weights all on the GPU when the policy has them all there, else
    Accelerate's ``dispatch_model`` with :func:`hf_device_map` (its CPU / disk offload hooks
    stream each module to the GPU when it runs). On a CPU engine every tier but disk is the
    same memory, so the model is used as built unless the policy puts weights on disk; those
    modules are written under ``offload_dir``/hf-accelerate (a fresh temporary folder when
    None) and read back by Accelerate when they run. ``placement`` says which, in one line.
    """
    device_map = hf_device_map(spec, policy, device)
    offloaded = any(v in ("cpu", "disk") for v in device_map.values()) if device.startswith("cuda") else \
        any(v == "disk" for v in device_map.values())
    module = hf_model(model, spec, dtype, seed, device=None if offloaded else device)
    if not offloaded:
        return module.to(device), f"all weights on {device}"
    try:
        import accelerate
    except ImportError as exc:
        raise ConfigError(
            "--baseline hf: the policy keeps weights off the compute device, so the baseline needs "
            "Accelerate's offloading (pip install accelerate)"
        ) from exc
    folder = Path(offload_dir or tempfile.mkdtemp(prefix="flexgen-hf-offload-")) / "hf-accelerate"
    # Modules holding buffers only (a Llama's rotary frequencies) have no weights to place:
    # they live on the compute device, which Accelerate requires every tensor to have.
    for name, _ in module.named_buffers():
        if not any(name.startswith(m + ".") for m in device_map):
            device_map[name.rsplit(".", 1)[0]] = device if device != "cuda" else "cuda:0"
    if not device.startswith("cuda"):
        device_map = {k: ("cpu" if v != "disk" else "disk") for k, v in device_map.items()}
    counts = {t: sum(1 for v in device_map.values() if v == t) for t in set(device_map.values())}
    module = accelerate.dispatch_model(module, device_map=device_map, main_device=device, offload_dir=str(folder))
    return module, "Accelerate offload, modules per tier " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def run_hf_baseline(
    model, spec, dtype, seed, policy, device, offload_dir, ids, kwargs, batch_size, warmup, repeat=1,
) -> dict[str, Any]:
    """HF ``generate`` on the same weights and prompts, ``batch_size`` sequences per call, the
    model placed by :func:`hf_placed_model`."""
    import torch

    module, placement = hf_placed_model(model, spec, dtype, seed, policy, device, offload_dir)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def generate(rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        longest = max(map(len, rows))
        input_ids = torch.full((len(rows), longest), spec.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, longest - len(row):] = torch.tensor(row)
            mask[i, longest - len(row):] = 1
        sampling = {"do_sample": True, "temperature": kwargs["temperature"], "top_p": kwargs["top_p"],
                    "top_k": kwargs["top_k"]} if kwargs["do_sample"] else {"do_sample": False}
        sampling["repetition_penalty"] = kwargs["repetition_penalty"]
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = module.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                pad_token_id=spec.pad_token_id, **sampling,
            )
        return out[:, longest:].tolist()

    new_tokens = kwargs["max_new_tokens"]
    if warmup:
        generate(ids[:batch_size], min(2, new_tokens))
    runs = []
    for _ in range(repeat):  # keep the fastest, as for the engine
        tokens: list[list[int]] = []
        sync()
        started = time.perf_counter()
        for start in range(0, len(ids), batch_size):
            tokens.extend(generate(ids[start:start + batch_size], new_tokens))
        sync()
        runs.append(time.perf_counter() - started)
    seconds = min(runs)
    generated = sum(len(t) for t in tokens)
    # Drop the model here, not at return: ``generate`` above holds it, and Accelerate's hooks
    # make reference cycles, so only then do gc and the CUDA cache release its memory.
    module = None
    gc.collect()
    _empty_cuda_cache()
    return {
        "name": "hf",
        "placement": placement,
        "batch_size": batch_size,
        "time_s": seconds,
        "generated_tokens": generated,
        "total_throughput": generated / seconds if seconds > 0 else None,
        "runs_total": [generated / s for s in runs if s > 0],
        "tokens": tokens,
    }


# --------------------------------------------------------------------------- printing


def _rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.1f}" if value >= 1 or value == 0 else f"{value:.3g}"  # a model larger than RAM: < 1


def format_report(r: BenchReport) -> str:
    """The lines ``flexgen bench`` prints."""
    p = r.policy
    tiers = lambda kind: f"{p[f'{kind}_gpu']:g}/{p[f'{kind}_cpu']:g}/{100 - p[f'{kind}_gpu'] - p[f'{kind}_cpu']:g}"  # noqa: E731
    names = {k: (v.get("name") if isinstance(v, dict) else v) for k, v in r.plugins.items() if k != "storage"}
    hw = r.hardware
    lines = [
        f"flexgen bench: {r.model}, {r.dtype}{'' if r.compute_dtype in (None, r.dtype) else ' computed in ' + r.compute_dtype}, "
        f"on {r.device}; {r.num_prompts} prompts x {r.prompt_len} tokens, "
        f"{r.gen_len} new tokens each",
        f"  policy: block {p['num_gpu_batches']} x {p['gpu_batch_size']}; gpu/cpu/disk % weights {tiers('weights')}, "
        f"cache {tiers('cache')}, activations {tiers('act')}; overlap {p['overlap']}, pin {p['pin_weights']}",
        f"  plugins: attention {names.get('attention')}, scheduler {names.get('scheduler')}, "
        f"compression weights {names.get('weight_compressor')} / cache {names.get('cache_compressor')}",
        f"  hardware: {hw['name']} [{hw['source']}]",
        f"    host->device {hw['h2d_bandwidth'] / 1e9:.1f} GB/s, device->host {hw['d2h_bandwidth'] / 1e9:.1f} GB/s, "
        f"disk read {hw['disk_read_bandwidth'] / 1e9:.2f} GB/s ({r.disk_cache}), "
        f"matmul {HardwareProfile(**hw).gpu_flops(r.compute_dtype or r.dtype) / 1e12:.2f} TFLOP/s ({r.compute_dtype or r.dtype}), "
        f"cpu attention {hw['cpu_attention_flops'] / 1e9:.1f} GFLOP/s",
        f"    memory: gpu {hw['gpu_memory'] / 2**30:.1f} GiB, cpu {hw['cpu_memory'] / 2**30:.1f} GiB, "
        f"disk {hw['disk_memory'] / 2**30:.1f} GiB",
        "",
        f"  {'tokens/s':<10}{'measured':>14}{'bound':>14}{'reached':>10}   bound set by",
    ]
    for kind in ("prefill", "decode", "total"):
        measured = getattr(r.measured, kind) if r.measured else None
        reached = r.reached(kind)
        by = r.bound_bottleneck.get(kind, "prefill bound + decode bound" if kind == "total" and r.bound.total else "-")
        lines.append(
            f"  {kind:<10}{_rate(measured):>14}{_rate(getattr(r.bound, kind)):>14}"
            f"{(f'{reached:.1f} %' if reached is not None else '-'):>10}   {by}"
        )
    if r.bound_note:
        lines.append(f"  {r.bound_note}")
    elif r.predicted_total is not None:
        lines.append(f"  (the cost model's prediction for this schedule, with its overheads: {_rate(r.predicted_total)} tokens/s)")
    if r.load_time_s is not None:
        lines.append(f"  engine loaded (weights placed) in {r.load_time_s:.1f} s")
    if r.threads:
        from flexgen.threads import ThreadChoice

        lines.append(f"  {ThreadChoice.from_dict(r.threads).describe()}; the baseline uses as many")
    if r.engine_stats and r.bound_bytes:
        moved = r.engine_stats["bytes_moved"]
        links = [k for k in r.bound_bytes if moved.get(k) or r.bound_bytes[k]]
        if links:
            lines.append("  bytes moved, measured | cost model: " + ", ".join(
                f"{k} {_gb(moved.get(k, 0))} | {_gb(r.bound_bytes[k])}" for k in links))
        peak = r.engine_stats["peak_memory"]
        lines.append("  peak memory, measured | cost model: " + ", ".join(
            f"{t} {_gb(peak.get(t, 0))} | {_gb(r.bound_peak.get(t, 0))}" for t in ("gpu", "cpu", "disk")))
    if r.peak_rss_anon is not None:
        lines.append(f"  peak RssAnon of the process (loading and generating): {_gb(r.peak_rss_anon)}")
    if r.baseline is not None:
        b = r.baseline
        ratio = f"{b['ratio']:.2f}x" if b.get("ratio") else "-"
        lines.append(
            f"  baseline hf: {_rate(b['total_throughput'])} tokens/s total (batch {b['batch_size']}, {b['placement']}); "
            f"flexgen / hf = {ratio}; identical outputs for {b['identical_outputs']}/{b['num_prompts']} prompts"
        )
        if len(b.get("runs_total") or []) > 1 and b.get("ratio_of_medians"):
            lines.append(f"    medians of {len(r.runs_total)} runs: flexgen {_rate(r.median_total())}, hf "
                         f"{_rate(statistics.median(b['runs_total']))} tokens/s; flexgen / hf = "
                         f"{b['ratio_of_medians']:.2f}x")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 1e12 else f"{n / 1e12:.2f} TB"


