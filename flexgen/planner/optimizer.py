"""Choose a policy automatically: the fastest one the cost model finds that fits every tier.

The search is exhaustive over what the engine can actually realise, not a linear program:

* The engine places whole tensors (weights, per model layer, by cumulative size) and whole
  cache units (per decoder layer and GPU batch, by count). A percentage therefore matters
  only through which tensors and units it moves, and between two tensor midpoints every
  percentage gives the same placement. So the weight percentages worth trying are one value
  per gap between the midpoints of the large tensors of a layer (q, k, v, out projections,
  fc1, fc2, embeddings, lm_head): about ten edges for the GPU and ten for the CPU.
* For fixed weights, more cache on a faster tier never costs time (the cost model is
  monotone in it), so the cache gets the largest number of units that still fits, computed
  directly from the bytes left; activations go to the GPU unless only the CPU fits them.
* Batch geometry, attention location and compression are discrete and enumerated.

Two stages keep it to a few seconds: every (attention, compression, gpu batch size, number of
GPU batches, activation tier) is first scored with two greedy placements (weights first, cache
first); the best few geometries are then searched over every weight edge pair.

Why not FlexGen's LP: its relaxation treats percentages as continuous and its time as one
max over a step, while the engine rounds to whole tensors and overlaps per layer; an LP
optimum must then be rounded and re-checked against memory anyway, and the discrete choices
(compression, attention, batch sizes) still need enumeration around it. Evaluating the exact
cost model on the few hundred placements that differ is cheaper than building the LP, needs no
solver dependency, and never returns a policy the model has not checked to fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from flexgen.errors import PolicyError
from flexgen.models.family import ModelSpec
from flexgen.planner.costmodel import Estimate, Workload, _layer_tensors, count_below, estimate
from flexgen.planner.hardware import HardwareProfile, format_bytes, get_hardware
from flexgen.policy import Policy

#: Fraction of each tier's capacity a chosen policy may use: the rest absorbs what the model
#: does not count (CUDA context and allocator fragmentation, Python and torch in RAM, files).
MARGINS = {"gpu": 0.90, "cpu": 0.80, "disk": 0.95}

GPU_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
COMPRESSIONS = ("none", "int4")
ATTENTIONS = ("gpu", "cpu")


@dataclass
class PolicyChoice:
    """The chosen policy, the plugins it needs, and the cost model's reasons."""

    policy: Policy
    #: {"attention", "weight_compressor", "cache_compressor", "scheduler"} -> registered name
    plugins: dict[str, str]
    predicted_throughput: float
    estimate: Estimate
    #: how many complete placements the search timed
    considered: int = 0
    hardware: HardwareProfile | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "policy": self.policy.to_dict(),
            "plugins": dict(self.plugins),
            "predicted_throughput": self.predicted_throughput,
            "considered": self.considered,
            "estimate": self.estimate.to_dict(),
        }
        if self.hardware is not None:
            out["hardware"] = self.hardware.to_dict()
            out["capacity"] = {t: getattr(self.hardware, f"{t}_memory") for t in ("gpu", "cpu", "disk")}
        return out


# --------------------------------------------------------------------------- feasibility


def violations(est: Estimate, hardware: HardwareProfile, margins: dict[str, float] | None = None) -> list[str]:
    """What does not fit: one line per over-full tier (empty when the policy fits).

    Without CUDA the gpu and cpu tiers are the same RAM, so their sum must fit the CPU.
    """
    margins = {**MARGINS, **(margins or {})}
    need = {tier: est.peak(tier) for tier in ("gpu", "cpu", "disk")}
    have = {tier: margins[tier] * getattr(hardware, f"{tier}_memory") for tier in ("gpu", "cpu", "disk")}
    out = [
        f"{tier}: needs {format_bytes(need[tier])}, may use {format_bytes(have[tier])}"
        for tier in ("gpu", "cpu", "disk") if need[tier] > have[tier]
    ]
    if hardware.shared_memory and need["gpu"] + need["cpu"] > have["cpu"]:
        out.append(f"gpu+cpu (one memory): needs {format_bytes(need['gpu'] + need['cpu'])}, may use {format_bytes(have['cpu'])}")
    return out


def violations_from(need: dict[str, float], hardware: HardwareProfile, margins: dict[str, float]) -> bool:
    """True when peak bytes per tier ``need`` exceed a tier (the fast form of :func:`violations`)."""
    for tier in ("gpu", "cpu", "disk"):
        if need[tier] > margins[tier] * getattr(hardware, f"{tier}_memory"):
            return True
    return not _cpu_ok(need, hardware, margins)


def _cpu_ok(need: dict[str, float], hardware: HardwareProfile, margins: dict[str, float]) -> bool:
    used = need["cpu"] + (need["gpu"] if hardware.shared_memory else 0)
    return used <= margins["cpu"] * hardware.cpu_memory


# --------------------------------------------------------------------------- percent helpers


def _nice(lo: float, hi: float) -> float:
    """A round number in (lo, hi]: the percentage shown to users for a placement."""
    if hi <= 0:
        return 0.0
    for step in (50, 25, 10, 5, 1, 0.5, 0.1, 0.01):
        value = math.floor(lo / step + 1) * step
        if lo < value <= hi:
            return round(value, 6)
    return round(hi, 6)


def weight_edges(spec: ModelSpec, compression: str, dtype: str) -> list[float]:
    """Cumulative percentages worth trying as a weight tier edge: one per gap between big-tensor midpoints."""
    mids = set()
    for kind in ("embed", "attn", "mlp", "head"):
        tensors = _layer_tensors(spec, kind, compression, dtype)
        total = sum(t.numel for t in tensors)
        start = 0
        for t in tensors:
            if t.numel >= 0.01 * total:
                mids.add(round(100.0 * (start + t.numel / 2) / total, 4))
            start += t.numel
    points = sorted(m for m in mids if 0 < m < 100)
    edges = [0.0]
    for i, m in enumerate(points):
        upper = points[i + 1] if i + 1 < len(points) else 100.0
        edges.append(_nice(m, upper))
    if edges[-1] != 100.0:
        edges.append(100.0)
    return sorted(set(edges))


def _edge_for_count(count: int, total: int) -> float:
    """A round cumulative percentage that puts exactly ``count`` of ``total`` equal units below it."""
    if count <= 0:
        return 0.0
    if count >= total:
        return 100.0
    edge = _nice(100.0 * (count - 0.5) / total, 100.0 * (count + 0.5) / total)
    # guard against float rounding: the engine's rule is what counts
    while count_below(edge, total) > count:
        edge = math.nextafter(edge, 0)
    return edge


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Plugins:
    attention: str
    weight_compression: str
    cache_compression: str
    pin: bool = True  # the policy's pin_weights: pinned host memory copies faster, at no cost in RAM


class _Search:
    def __init__(self, spec, workload, hardware, dtype, scheduler, margins):
        self.spec, self.workload, self.hw, self.dtype = spec, workload, hardware, dtype
        self.scheduler, self.margins = scheduler, {**MARGINS, **(margins or {})}
        self.considered = 0

    def _estimate(self, policy: Policy, plugins: _Plugins, memory_only: bool) -> Estimate:
        return estimate(
            self.spec, policy, self.workload, self.hw, attention=plugins.attention,
            weight_compression=plugins.weight_compression, cache_compression=plugins.cache_compression,
            scheduler=self.scheduler, dtype=self.dtype, memory_only=memory_only,
        )

    def _fits(self, policy: Policy, plugins: _Plugins) -> bool:
        return not violations(self._estimate(policy, plugins, True), self.hw, self.margins)

    def _policy(self, gbs, nb, wg_edge, w_edge2, cg_edge, c_edge2, act_gpu, pin=True) -> Policy | None:
        try:
            return Policy(
                pin_weights=pin,
                gpu_batch_size=gbs, num_gpu_batches=nb,
                weights_gpu=wg_edge, weights_cpu=round(w_edge2 - wg_edge, 6),
                cache_gpu=cg_edge, cache_cpu=round(c_edge2 - cg_edge, 6),
                act_gpu=100.0 if act_gpu else 0.0, act_cpu=0.0 if act_gpu else 100.0,
            )
        except PolicyError:
            return None

    def place(self, gbs, nb, plugins, wg_edge, w_edge2, act_gpu) -> Policy | None:
        """Given weight edges, the most cache units on the GPU, then on the CPU; None if nothing fits.

        The GPU's need grows with its cache units (until all are there, when fetch buffers go),
        the CPU's with its own: each count is the largest that keeps its tier within capacity;
        the disk then takes the rest, if it can.
        """
        N = self.spec.num_layers * nb
        cache_on_gpu_useful = plugins.attention == "gpu" or self.hw.shared_memory

        def make(n_g: int, n_c: int) -> Policy | None:
            return self._policy(gbs, nb, wg_edge, w_edge2, _edge_for_count(n_g, N), _edge_for_count(n_g + n_c, N), act_gpu,
                                plugins.pin)

        def need(n_g: int, n_c: int) -> dict[str, float] | None:
            policy = make(n_g, n_c)
            if policy is None:
                return None
            est = self._estimate(policy, plugins, True)
            return {t: est.peak(t) for t in ("gpu", "cpu", "disk")}

        hw, m = self.hw, self.margins
        gpu_cap = m["gpu"] * hw.gpu_memory
        cpu_cap = m["cpu"] * hw.cpu_memory
        base = need(0, 0)
        if base is None:
            return None
        cpu_left = cpu_cap - base["cpu"] - (base["gpu"] if hw.shared_memory else 0)
        if base["gpu"] > gpu_cap or cpu_left < 0:
            return None
        one = need(1, 0) if N >= 1 and cache_on_gpu_useful else None
        unit = (one["gpu"] - base["gpu"]) if one is not None else 0.0

        def fits(n_g: int, n_c: int) -> bool:
            got = need(n_g, n_c)
            return got is not None and not violations_from(got, hw, m)

        def gpu_fits(n_g: int) -> bool:
            """``n_g`` units on the GPU, none on the CPU: do the GPU and the host's RAM hold it?"""
            got = need(n_g, 0)
            return got is not None and got["gpu"] <= gpu_cap and _cpu_ok(got, hw, m)

        # GPU: all units (fetch buffers then vanish), else as many as the bytes left allow.
        n_g = 0
        if cache_on_gpu_useful and unit > 0:
            if gpu_fits(N):
                n_g = N
            else:
                n_g = int(min(N - 1, max(0, (gpu_cap - base["gpu"]) // unit)))
                if hw.shared_memory:
                    n_g = int(min(n_g, max(0, cpu_left // unit)))
                while n_g > 0 and not gpu_fits(n_g):
                    n_g -= 1
        # CPU: as many of the remaining units as fit.
        n_c = 0
        rest = N - n_g
        if rest and _cpu_ok(need(n_g, rest), hw, m):
            # all of them: with CPU attention the host's buffers for fetched cache then vanish
            n_c = rest
        elif rest:
            at_gpu = need(n_g, 0)
            one_c = need(n_g, 1)
            unit_c = one_c["cpu"] - at_gpu["cpu"]
            left = cpu_cap - at_gpu["cpu"] - (at_gpu["gpu"] if hw.shared_memory else 0)
            n_c = rest if unit_c <= 0 else int(min(rest, max(0, left // unit_c)))
            while n_c > 0 and not _cpu_ok(need(n_g, n_c), hw, m):
                n_c -= 1
        policy = make(n_g, n_c)
        if policy is None or not fits(n_g, n_c):
            return None
        return policy

    @staticmethod
    def _largest(ok, lo: int, hi: int) -> int | None:
        """The largest k in [lo, hi] with ok(k), assuming ok is true up to some k and false after."""
        if not ok(lo):
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def time(self, policy: Policy, plugins: _Plugins) -> Estimate:
        self.considered += 1
        return self._estimate(policy, plugins, False)

    def _weights_fit(self, gbs, nb, plugins, wg, w2, act_gpu, tier: str) -> bool:
        """Do the weights fit ``tier`` ("gpu" or "cpu") with the whole cache on disk (the least it needs)?

        The GPU's need grows with the GPU edge (until every layer is resident and fetch buffers
        vanish); the CPU's (with the GPU's, where they share one memory) with the CPU edge.
        """
        policy = self._policy(gbs, nb, wg, w2, 0.0, 0.0, act_gpu, plugins.pin)
        if policy is None:
            return False
        est = self._estimate(policy, plugins, True)
        need = {t: est.peak(t) for t in ("gpu", "cpu")}
        if tier == "gpu":
            return need["gpu"] <= self.margins["gpu"] * self.hw.gpu_memory
        return _cpu_ok(need, self.hw, self.margins)

    def _gpu_edge(self, gbs, nb, plugins, edges, act_gpu) -> int | None:
        """Index of the largest weight edge whose GPU share fits (the rest of the weights on the CPU)."""
        fits = lambda k: self._weights_fit(gbs, nb, plugins, edges[k], 100.0, act_gpu, "gpu")  # noqa: E731
        if fits(len(edges) - 1):
            return len(edges) - 1
        return self._largest(fits, 0, len(edges) - 2) if len(edges) > 1 else None

    def _cpu_edges(self, gbs, nb, plugins, edges, wg, act_gpu) -> list[float]:
        """The GPU+CPU edges above ``wg`` whose CPU share fits, largest last."""
        upper = [e for e in edges if e >= wg]
        j = self._largest(lambda k: self._weights_fit(gbs, nb, plugins, wg, upper[k], act_gpu, "cpu"), 0, len(upper) - 1)
        return [] if j is None else upper[: j + 1]

    def greedy(self, gbs, nb, plugins, edges, act_gpu) -> list[Policy]:
        """Two quick placements: weights take the fast tiers first, or the cache does."""
        out = []
        # weights first: the largest GPU edge, then the largest CPU edge, that fit
        i = self._gpu_edge(gbs, nb, plugins, edges, act_gpu)
        if i is not None:
            upper = self._cpu_edges(gbs, nb, plugins, edges, edges[i], act_gpu)
            p = self.place(gbs, nb, plugins, edges[i], upper[-1], act_gpu) if upper else None
            if p is not None:
                out.append(p)
        # cache first: no weights on the GPU, the GPU all to the cache; weights on the CPU as they fit
        upper = self._cpu_edges(gbs, nb, plugins, edges, 0.0, act_gpu)
        if upper:
            p = self.place(gbs, nb, plugins, 0.0, upper[-1], act_gpu)
            if p is not None:
                out.append(p)
        return out

    def full(self, gbs, nb, plugins, edges, act_gpu) -> list[Policy]:
        """Every pair of weight edges (GPU, GPU+CPU) that fits, with the most cache around it."""
        out = []
        top = self._gpu_edge(gbs, nb, plugins, edges, act_gpu)
        if top is None:
            return out
        for wg in edges[: top + 1]:
            for w2 in reversed(self._cpu_edges(gbs, nb, plugins, edges, wg, act_gpu)):
                p = self.place(gbs, nb, plugins, wg, w2, act_gpu)
                if p is not None:
                    out.append(p)
        return out


def auto_policy(
    spec: ModelSpec,
    prompt_len: int,
    gen_len: int,
    hardware: HardwareProfile | None = None,
    num_prompts: int | None = None,
    *,
    dtype: str = "float16",
    attentions: Iterable[str] = ATTENTIONS,
    weight_compressions: Iterable[str] = COMPRESSIONS,
    cache_compressions: Iterable[str] = COMPRESSIONS,
    gpu_batch_sizes: Iterable[int] = GPU_BATCH_SIZES,
    num_gpu_batches: Iterable[int] = NUM_GPU_BATCHES,
    scheduler: str = "zigzag",
    margins: dict[str, float] | None = None,
    refine: int = 8,
) -> PolicyChoice:
    """The policy (and plugins) with the highest predicted throughput that fits ``hardware``.

    ``hardware`` defaults to this machine's measured (cached) profile. ``num_prompts`` caps the
    block size (no block larger than the run) and counts partial blocks. Raises PolicyError
    when nothing fits, naming the tier that is short.
    """
    workload = Workload(prompt_len, gen_len, num_prompts)
    hw = hardware if hardware is not None else get_hardware(None)
    search = _Search(spec, workload, hw, dtype, scheduler, margins)
    # Pinning costs no RAM (the CPU tier page-locks its own allocations in place), so a pinned
    # policy needs the same memory as an unpinned one and is never slower, unless the profile
    # says pageable copies are faster in some direction: only then is not pinning priced too.
    pins: tuple[bool, ...] = (True,)
    if hw.device == "cuda" and not hw.shared_memory:
        pageable = hw.unpinned()
        if pageable.h2d_bandwidth > hw.h2d_bandwidth or pageable.d2h_bandwidth > hw.d2h_bandwidth:
            pins = (True, False)
    combos = [
        _Plugins(a, w, c, pin)
        for a in dict.fromkeys(attentions) for w in dict.fromkeys(weight_compressions)
        for c in dict.fromkeys(cache_compressions) for pin in pins
    ]
    gbs_list = sorted(set(gpu_batch_sizes))
    nb_list = sorted(set(num_gpu_batches))
    if num_prompts is not None:
        gbs_list = [g for g in gbs_list if g <= num_prompts] or [1]

    # Stage 1: greedy placements for every discrete choice.
    scored: list[tuple[float, tuple]] = []
    best: tuple[float, Policy, _Plugins, Estimate] | None = None
    for plugins in combos:
        edges = weight_edges(spec, plugins.weight_compression, dtype)
        for nb in nb_list:
            for gbs in gbs_list:
                if num_prompts is not None and gbs * nb > max(num_prompts, gbs):
                    continue
                acts = (True, False) if nb > 1 and scheduler == "zigzag" else (True,)
                fitted = False
                for act_gpu in acts:
                    for policy in search.greedy(gbs, nb, plugins, edges, act_gpu):
                        fitted = True
                        est = search.time(policy, plugins)
                        value = est.predicted_throughput
                        scored.append((value, (gbs, nb, plugins, act_gpu)))
                        if best is None or value > best[0]:
                            best = (value, policy, plugins, est)
                if not fitted:
                    break  # a larger GPU batch will not fit either
    if best is None:
        smallest = Policy(gpu_batch_size=1, num_gpu_batches=1, weights_gpu=0, weights_cpu=0, cache_gpu=0, cache_cpu=0,
                          act_gpu=0, act_cpu=100)
        est = estimate(spec, smallest, workload, hw, dtype=dtype, memory_only=True)
        short = "; ".join(violations(est, hw, margins)) or "no placement fits"
        raise PolicyError(f"no policy fits {spec.name} on {hw.name} even with everything offloaded ({short})")

    # Stage 2: every weight edge pair for the best geometries.
    seen = set()
    for value, key in sorted(scored, key=lambda item: -item[0]):
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > refine:
            break
        gbs, nb, plugins, act_gpu = key
        edges = weight_edges(spec, plugins.weight_compression, dtype)
        for policy in search.full(gbs, nb, plugins, edges, act_gpu):
            est = search.time(policy, plugins)
            if est.predicted_throughput > best[0]:
                best = (est.predicted_throughput, policy, plugins, est)

    value, policy, plugins, est = best
    return PolicyChoice(
        policy=policy,
        plugins=dict(est.plugins),
        predicted_throughput=value,
        estimate=est,
        considered=search.considered,
        hardware=hw,
    )


def hand_written_grid() -> list[tuple[Policy, dict[str, str]]]:
    """Policies a person would try by hand: the yardstick the automatic choice is checked against.

    Weights 0 / 20 / 50 % on the GPU and the rest on the CPU, the cache on the CPU, CPU or GPU
    attention, four batch geometries; and int4 weights and cache at three weight placements:
    27 policies. ``flexgen policy --grid`` prices each beside the automatic choice.
    """
    grid: list[tuple[Policy, dict[str, str]]] = []
    plain = {"weight_compressor": "none", "cache_compressor": "none"}
    for gbs, nb in ((8, 1), (32, 1), (32, 4), (64, 4)):
        for weights_gpu in (0, 20, 50):
            for attention in ("cpu", "gpu"):
                policy = Policy(gbs, nb, weights_gpu, 100 - weights_gpu, 0, 100, 100, 0)
                grid.append((policy, {"attention": attention, **plain}))
    for weights_gpu in (0, 50, 100):
        policy = Policy(64, 4, weights_gpu, 100 - weights_gpu, 0, 100, 100, 0)
        grid.append((policy, {"attention": "gpu", "weight_compressor": "int4", "cache_compressor": "int4"}))
    return grid


def auto_policy_for_run(
    spec: ModelSpec,
    prompt_len: int,
    gen_len: int,
    num_prompts: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    hardware: str | HardwareProfile | None = None,
    **caps: Any,
) -> PolicyChoice:
    """What ``policy: auto`` in a config resolves to at run time.

    ``hardware``: a profile, a preset name or a YAML file; None measures this machine for
    ``device`` (cached after the first run). ``caps``: ``gpu_memory="24GiB"`` etc., the
    config's ``hardware.*`` capacity keys.
    """
    profile = get_hardware(hardware, device=device, **caps)
    return auto_policy(spec, prompt_len, gen_len, profile, num_prompts, dtype=dtype)


# --------------------------------------------------------------------------- a model to plan for


def load_spec(model: str) -> ModelSpec:
    """A size name of any family (``opt-30b``, ``llama-3.1-70b``), or an HF checkpoint directory (its config.json)."""
    from flexgen.errors import CheckpointError

    path = Path(model)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{model}: no config.json in this directory")
        from flexgen.models.checkpoint import read_small

        try:
            values = json.loads(read_small(config))
        except ValueError as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc})") from exc
        from flexgen.models.families import family_for_config

        return family_for_config(values, name=str(config)).spec_from_hf_config(values, name=path.name)
    from flexgen.models.checkpoint import size_names, synthetic_spec

    spec = synthetic_spec(model)
    if spec is None:
        raise CheckpointError(f"unknown model size {model!r}; sizes: {', '.join(size_names())}")
    return spec


