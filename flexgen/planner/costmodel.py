"""A cost model of one block: bytes per link, FLOPs, time and peak memory for any policy.

It mirrors what ``flexgen/engine/`` does, tensor by tensor, rather than FlexGen's paper
formulas, so that its byte counts can be checked against ``engine.stats``:

* The model is the list ``[embed, attn 0, mlp 0, ..., attn L-1, mlp L-1, head]``. The weights
  of each model layer are cut into tiers by :func:`flexgen.policy.split_by_percent` over their
  sizes, each tensor whole; so every attention layer has the same placement, and so has every
  MLP layer. A layer whose tensors are all on the GPU and uncompressed is used in place; any
  other layer is fetched (and decompressed) on the weight I/O thread once per step with the
  zig-zag schedule (once per step *and GPU batch* with the row schedule), starting when the
  layer before it starts computing. Compressors pack every weight with two or more dimensions.
* The KV cache is one unit per (decoder layer, GPU batch), ``prompt_len + gen_len`` tokens
  long, placed by count. During decode a unit that does not live where attention runs has its
  prefix ``[0, t)`` fetched there on the cache I/O thread; the new token's keys and values are
  written to the unit's home tier, on the store stream when that is pinned CPU memory on CUDA
  (but CPU attention's decode waits for them), else synchronously on the compute thread, as
  are activations of a GPU batch whose next task is another batch (zig-zag with several GPU
  batches).
* Time per model layer = max(its cache and activation loads + the next layer's weight load,
  its compute + the next layer's decompression + synchronous stores, its store-stream writes)
  when the policy overlaps; the first layer's weights load before anything computes; without
  overlap everything adds up. A phase is the sum over layers. This is the *prediction*.
  The *bound* ("roofline", what ``flexgen bench`` prints) is the largest single resource total
  of a phase: bytes ÷ bandwidth for each link, FLOPs ÷ rate for each processor.
* Compute time of an operation is max(FLOPs ÷ matmul rate, bytes touched ÷ memory bandwidth):
  decode matmuls on small batches are bound by reading the weights, not by arithmetic.
* Decode is evaluated at the mean context length ``prompt_len + gen_len / 2`` and multiplied by
  ``gen_len - 1`` steps (every term but the per-layer max is linear in the length).
* Throughput follows FlexGen: generated tokens ÷ (prefill + decode time).

Memory per tier is the peak: resident weights, cache and activations at their stored bytes
(pinning costs no RAM: the CPU tier page-locks its own allocations with ``cudaHostRegister``;
it only makes copies faster), plus, on the compute device, two layers of fetched or
decompressed weights (the current one and the prefetched next one), fetched cache prefixes,
and the working tensors of the largest operation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from flexgen.errors import ConfigError
from flexgen.planner.hardware import HardwareProfile, format_bytes
from flexgen.models.families import family_for_spec
from flexgen.models.family import ModelSpec
from flexgen.policy import Policy, split_by_percent

LINKS = ("disk->cpu", "cpu->gpu", "gpu->cpu", "cpu->disk")
RESOURCES = LINKS + ("gpu_compute", "cpu_compute", "overhead")
_DTYPE_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def _layers_of_kind(num_layers: int) -> dict[str, int]:
    """How many model layers of each kind a model with ``num_layers`` decoder layers has."""
    return {"embed": 1, "attn": num_layers, "mlp": num_layers, "head": 1}


@dataclass(frozen=True)
class Workload:
    """What is generated: prompts of ``prompt_len`` tokens, ``gen_len`` new tokens each."""

    prompt_len: int
    gen_len: int
    #: prompts in the whole run; None: as many as one block holds (throughput of one block).
    num_prompts: int | None = None

    def __post_init__(self) -> None:
        for key in ("prompt_len", "gen_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if self.num_prompts is not None and (not isinstance(self.num_prompts, int) or self.num_prompts < 1):
            raise ConfigError(f"num_prompts must be an integer >= 1, got {self.num_prompts!r}")


# --------------------------------------------------------------------------- byte counts


def _normalize_compression(name: str | None) -> str:
    return "none" if name in (None, "", "none") else str(name)


@lru_cache(maxsize=None)
def _compressor(name: str):
    """The registered compressor instance, so byte counts are the plugin's own."""
    from flexgen import registry

    return registry.load("compressor", name)()


@lru_cache(maxsize=None)
def stored_bytes(shape: tuple[int, ...], compression: str, dtype: str) -> int:
    """Bytes a tensor of ``shape`` occupies at rest under ``compression`` (``none``, ``int4``, ...)."""
    size = _DTYPE_SIZE[dtype]
    numel = math.prod(shape)
    if compression == "none":
        return numel * size
    try:
        import torch

        return int(_compressor(compression).nbytes(tuple(shape), getattr(torch, dtype)))
    except Exception:
        # Fallback for a compressor that cannot be loaded: group-wise, 64 values per group along
        # the last axis, float16 min and scale per group.
        bits = {"int4": 4, "int8": 8}.get(compression)
        if bits is None:
            raise ConfigError(f"unknown compression {compression!r}; known: none, int4, int8")
        rows, last = numel // shape[-1], shape[-1]
        return rows * (math.ceil(last * bits / 8) + 2 * 2 * math.ceil(last / 64))


@dataclass(frozen=True)
class _Tensor:
    numel: int
    raw: int       # bytes in the compute dtype
    stored: int    # bytes at rest (compressed or not)
    compressed: bool
    row: tuple[int, ...] | None = None  # an embedding table whose rows can be gathered where it lives: one row's shape


#: The model layer whose weights stand for every layer of a kind (all attention layers are alike, all MLPs).
_KIND_INDEX = {"embed": lambda spec: 0, "attn": lambda spec: 1, "mlp": lambda spec: 2,
               "head": lambda spec: spec.num_model_layers - 1}


@dataclass(frozen=True)
class _Arithmetic:
    """What the cost model needs of a model's mathematics, from its family (so any family is priced).

    Per token (of one sequence): matrix-product FLOPs of each kind of layer (the head's per
    sequence), cache bytes per token of one attention layer uncompressed, the KV heads and head
    size a cache unit holds, the widest MLP activation, and the sliding window of each layer
    (None: full attention). For OPT these are the cost model's former formulas exactly
    (8·h², 4·h·ffn, 2·h·E + 2·E·V; 2·h per token of cache).
    """

    flops: dict[str, int]
    cache_raw: int  # bytes per token of k and v of one layer, in the compute dtype's size 1 (multiply by dsize)
    kv_heads: int
    head_dim: int
    ffn: int
    windows: tuple[int | None, ...]
    attention_per_key: int  # attention FLOPs per (query, key) pair: 4 · query heads · head_dim

    def keys(self, context: float) -> float:
        """Keys a query over ``context`` positions attends to, averaged over the layers (fewer in a window).

        ``context`` itself (its type too) without windows, so full-attention figures are unchanged."""
        if all(w is None for w in self.windows):
            return context
        return sum(context if w is None else min(context, w) for w in self.windows) / len(self.windows)


@lru_cache(maxsize=256)
def arithmetic(spec: ModelSpec) -> _Arithmetic:
    """The family's arithmetic of ``spec`` (memoised: the policy search asks for it often)."""
    family = family_for_spec(spec)
    flops = {kind: family.matmul_flops(spec, index(spec), 1) for kind, index in _KIND_INDEX.items()}
    geometry = family.cache_geometry(spec, 0)
    mlp = [w.shape[0] for w in family.layer_weights(spec, 2) if len(w.shape) == 2]
    return _Arithmetic(
        flops=flops,
        cache_raw=family.cache_bytes_per_token(spec, 0, 1),
        kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        ffn=max(mlp, default=spec.hidden_size),
        windows=tuple(family.cache_geometry(spec, layer).window for layer in range(spec.num_layers)),
        attention_per_key=family.attention_flops(spec, 0, 1, 1),
    )


@lru_cache(maxsize=256)
def _layer_tensors(spec: ModelSpec, kind: str, compression: str, dtype: str) -> tuple[_Tensor, ...]:
    family = family_for_spec(spec)
    out = []
    for w in family.layer_weights(spec, _KIND_INDEX[kind](spec)):
        numel = math.prod(w.shape)
        compressed = len(w.shape) >= 2 and compression != "none"
        comp = compression if compressed else "none"
        gatherable = w.name in family.embedding_tables and (not compressed or _keeps_rows(comp, w.shape, dtype))
        out.append(_Tensor(numel, numel * _DTYPE_SIZE[dtype], stored_bytes(w.shape, comp, dtype), compressed,
                           tuple(w.shape[1:]) if gatherable else None))
    return tuple(out)


def _keeps_rows(compression: str, shape: tuple[int, ...], dtype: str) -> bool:
    """The engine's rule (:func:`flexgen.compression.base.keeps_rows`) for a compressor by name."""
    import torch

    from flexgen.compression.base import keeps_rows

    return keeps_rows(_compressor(compression), shape, getattr(torch, dtype))


@dataclass(frozen=True)
class _LayerWeights:
    """One model layer's weights under a placement: bytes per tier and what a load moves."""

    resident: bool                 # used in place: all on GPU, uncompressed
    stored: dict[str, int]         # tier -> stored bytes
    loaded: dict[str, int]         # tier -> stored bytes a load of the layer moves (gathered tables aside)
    gathered: tuple[tuple[str, tuple[int, ...], bool], ...]  # embedding tables read row by row: (tier, row shape, compressed)
    raw_fetched: int               # bytes in compute dtype materialised by a load (staging)
    decompressed_raw: int          # raw bytes produced by decompression per load
    raw_total: int                 # raw bytes of the whole layer (read by its matmuls)
    largest_compressed: int = 0    # raw bytes of its largest compressed tensor (decompression temporaries)


@lru_cache(maxsize=65536)
def _place_layer(tensors: tuple[_Tensor, ...], gpu: float, cpu: float, cuda: bool) -> _LayerWeights:
    """Bytes per tier of one layer; what a load fetches (a host tensor is used in place without CUDA).

    An embedding table not usable in place is not loaded with its layer: the engine gathers the
    rows each step needs where the table lives (see ``gathered``).
    """
    tiers = split_by_percent([t.numel for t in tensors], {"gpu": gpu, "cpu": cpu, "disk": 100 - gpu - cpu})
    stored = {"gpu": 0, "cpu": 0, "disk": 0}
    loaded = {"gpu": 0, "cpu": 0, "disk": 0}
    gathered = []
    raw_fetched = decompressed = 0
    for t, tier in zip(tensors, tiers):
        stored[tier] += t.stored
        if t.row is not None and (tier != "gpu" or t.compressed):
            gathered.append((tier, t.row, t.compressed))
            continue
        loaded[tier] += t.stored
        if t.compressed:
            decompressed += t.raw
            raw_fetched += t.raw + (t.stored if tier == "disk" or (tier == "cpu" and cuda) else 0)
        elif tier == "disk" or (tier == "cpu" and cuda):
            raw_fetched += t.raw
    resident = all(tier == "gpu" and not t.compressed for t, tier in zip(tensors, tiers))
    largest = max((t.raw for t in tensors if t.compressed), default=0)
    return _LayerWeights(resident, stored, loaded, tuple(gathered), raw_fetched, decompressed,
                         sum(t.raw for t in tensors), largest)


@lru_cache(maxsize=65536)
def _place_layers(spec: ModelSpec, compression: str, dtype: str, gpu: float, cpu: float, cuda: bool) -> dict[str, _LayerWeights]:
    """The four kinds of model layer under one weight placement (memoised: the search asks often)."""
    return {kind: _place_layer(_layer_tensors(spec, kind, compression, dtype), gpu, cpu, cuda)
            for kind in ("embed", "attn", "mlp", "head")}


def cache_unit_counts(spec: ModelSpec, policy: Policy) -> list[dict[str, int]]:
    """Per decoder layer, how many of its GPU batches' cache units live in each tier."""
    pct = policy.percents("cache")
    return [dict(c) for c in _cache_counts(spec.num_layers, policy.num_gpu_batches, pct["gpu"], pct["cpu"])]


@lru_cache(maxsize=4096)
def _cache_groups(L: int, K: int, gpu: float, cpu: float) -> tuple[Counter, Counter]:
    """(decoder layers per tier mix, units per tier) of a cache placement."""
    groups = Counter(_cache_counts(L, K, gpu, cpu))
    units: Counter = Counter()
    for mix, count in groups.items():
        for tier, n in mix:
            units[tier] += n * count
    return groups, units


def count_below(edge: float, total: int) -> int:
    """How many of ``total`` equal units :func:`split_by_percent` puts below cumulative ``edge`` percent.

    Unit i (midpoint at ``100 * (i + 0.5) / total``) is below when its midpoint is ``< edge``;
    computed in O(1), then checked with the very float expression the policy module uses.
    """
    count = min(max(math.ceil(edge * total / 100.0 - 0.5), 0), total)
    while count > 0 and not 100.0 * ((count - 1) + 0.5) / total < edge:
        count -= 1
    while count < total and 100.0 * (count + 0.5) / total < edge:
        count += 1
    return count


@lru_cache(maxsize=4096)
def _cache_counts(L: int, K: int, gpu: float, cpu: float) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Units laid out layer-major, cut at the gpu and gpu+cpu edges (as the engine's split)."""
    N = L * K
    n_gpu = count_below(0.0 + gpu, N)
    n_gc = max(count_below(0.0 + gpu + cpu, N), n_gpu)
    if gpu + cpu <= 0 or (n_gc == 0 and 100 - gpu - cpu <= 0):
        n_gpu = n_gc = 0
    out = []
    for layer in range(L):
        lo, hi = layer * K, (layer + 1) * K
        g = max(0, min(hi, n_gpu) - lo)
        c = max(0, min(hi, n_gc) - max(lo, n_gpu))
        counts = {"gpu": g, "cpu": c, "disk": K - g - c}
        out.append(tuple(sorted((t, v) for t, v in counts.items() if v)))
    return tuple(out)


@lru_cache(maxsize=64)
def _unpinned(hardware: HardwareProfile) -> HardwareProfile:
    """``hardware.unpinned()``, remembered (profiles are frozen, so hashable)."""
    return hardware.unpinned()


# --------------------------------------------------------------------------- results


@dataclass
class PhaseCost:
    """One phase (prefill: one step; decode: all steps after it) of one block."""

    steps: int
    bytes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LINKS, 0.0))
    gpu_flops: float = 0.0
    cpu_flops: float = 0.0
    #: seconds each resource is busy over the phase (the terms of the roofline)
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0.0))
    #: predicted seconds: per layer max(loads, compute + stores), summed
    predicted_s: float = 0.0

    @property
    def bound_s(self) -> float:
        """The roofline: no schedule can finish the phase faster than its busiest resource."""
        return max(v for k, v in self.times.items() if k != "overhead")

    @property
    def bottleneck(self) -> str:
        return max((k for k in self.times if k != "overhead"), key=lambda k: self.times[k])

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "bytes": dict(self.bytes), "gpu_flops": self.gpu_flops, "cpu_flops": self.cpu_flops,
            "times_s": dict(self.times), "bound_s": self.bound_s, "bottleneck": self.bottleneck,
            "predicted_s": self.predicted_s,
        }


@dataclass
class Estimate:
    """The cost model's answer for one policy on one machine."""

    policy: Policy
    plugins: dict[str, str]
    workload: Workload
    hardware_name: str
    dtype: str
    prefill: PhaseCost
    decode: PhaseCost
    #: tier -> {"weights", "cache", "act", "staging", "working", "total"} in bytes, at peak
    memory: dict[str, dict[str, float]]
    #: blocks in the run and generated tokens over all of them
    num_blocks: int
    generated_tokens: int

    @property
    def block_time_s(self) -> float:
        return self.prefill.predicted_s + self.decode.predicted_s

    @property
    def predicted_time_s(self) -> float:
        return self.num_blocks * self.block_time_s

    @property
    def predicted_throughput(self) -> float:
        """Generated tokens per second (FlexGen's definition), as the model predicts."""
        return self.generated_tokens / self.predicted_time_s if self.predicted_time_s > 0 else float("inf")

    @property
    def bound_throughput(self) -> float:
        """Tokens per second at the roofline: the most any schedule could reach with this policy."""
        seconds = self.num_blocks * (self.prefill.bound_s + self.decode.bound_s)
        return self.generated_tokens / seconds if seconds > 0 else float("inf")

    @property
    def prefill_throughput(self) -> float:
        """Prompt tokens per second in prefill."""
        tokens = self.policy.block_size * self.workload.prompt_len
        return tokens / self.prefill.predicted_s if self.prefill.predicted_s > 0 else float("inf")

    @property
    def decode_throughput(self) -> float:
        """Generated tokens per second in decode (the tokens after the first)."""
        tokens = self.policy.block_size * (self.workload.gen_len - 1)
        return tokens / self.decode.predicted_s if self.decode.predicted_s > 0 else float("inf")

    def peak(self, tier: str) -> float:
        return self.memory[tier]["total"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "plugins": dict(self.plugins),
            "workload": asdict(self.workload),
            "hardware": self.hardware_name,
            "dtype": self.dtype,
            "predicted_throughput": self.predicted_throughput,
            "bound_throughput": self.bound_throughput,
            "prefill_throughput": self.prefill_throughput,
            "decode_throughput": self.decode_throughput,
            "predicted_time_s": self.predicted_time_s,
            "num_blocks": self.num_blocks,
            "generated_tokens": self.generated_tokens,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
            "peak_memory": {tier: parts["total"] for tier, parts in self.memory.items()},
            "memory": {tier: dict(parts) for tier, parts in self.memory.items()},
        }

    def describe(self) -> str:
        """A readable breakdown: per phase the time of every resource, and peak memory per tier."""
        lines = [
            f"predicted throughput {self.predicted_throughput:.2f} token/s "
            f"(bound {self.bound_throughput:.2f}); prefill {self.prefill_throughput:.1f} prompt token/s, "
            f"decode {self.decode_throughput:.2f} token/s",
        ]
        for name, phase in (("prefill", self.prefill), ("decode", self.decode)):
            terms = ", ".join(f"{k} {v:.3g}s" for k, v in phase.times.items() if v > 0)
            lines.append(
                f"  {name:<7} predicted {phase.predicted_s:.3g}s, bound {phase.bound_s:.3g}s by {phase.bottleneck}: {terms}"
            )
        for tier, parts in self.memory.items():
            terms = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if k != "total" and v > 0)
            lines.append(f"  {tier:<4} peak {format_bytes(parts['total'])}" + (f" ({terms})" if terms else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------- the model


class _Rates:
    """Seconds for bytes and FLOPs on this machine."""

    def __init__(self, hw: HardwareProfile, dtype: str) -> None:
        self.hw = hw
        self.flops = hw.gpu_flops(dtype)
        self.cuda = hw.device == "cuda" and not hw.shared_memory

    def gpu_op(self, flops: float, nbytes: float) -> float:
        """A kernel on the compute device: arithmetic- or memory-bound, whichever is slower."""
        return max(flops / self.flops, nbytes / self.hw.gpu_memory_bandwidth)

    def mem_pass(self, nbytes: float, on_cpu: bool) -> float:
        """A copy of ``nbytes`` in host memory (``on_cpu``) or on the compute device."""
        bw = self.hw.cpu_memory_bandwidth if (on_cpu or not self.cuda) else self.hw.gpu_memory_bandwidth
        return nbytes / bw

    def codec(self, raw_bytes: float, on_cpu: bool) -> float:
        """Group-wise (de)compression producing or consuming ``raw_bytes`` of float16 data."""
        return raw_bytes / self.hw.decompress_rate(on_cpu or not self.cuda)


def _move(cost: dict[str, float], tier: str, dest_is_gpu: bool, nbytes: float, cuda: bool) -> None:
    """Count a read of ``nbytes`` from ``tier`` to the compute device (gpu) or host (cpu), as the engine does."""
    if tier == "disk":
        cost["disk->cpu"] += nbytes
    if cuda and dest_is_gpu and tier != "gpu":
        cost["cpu->gpu"] += nbytes
    if cuda and not dest_is_gpu and tier == "gpu":
        cost["gpu->cpu"] += nbytes


def _store(cost: dict[str, float], tier: str, nbytes: float, cuda: bool) -> None:
    """Count a write of ``nbytes`` computed on the compute device into ``tier``."""
    if cuda and tier != "gpu":
        cost["gpu->cpu"] += nbytes
    if tier == "disk":
        cost["cpu->disk"] += nbytes


def _link_seconds(b: dict[str, float], hw: HardwareProfile) -> float:
    return (
        b["disk->cpu"] / hw.disk_read_bandwidth + b["cpu->gpu"] / hw.h2d_bandwidth
        + b["gpu->cpu"] / hw.d2h_bandwidth + b["cpu->disk"] / hw.disk_write_bandwidth
    )


def estimate_options(plugins: dict[str, Any] | None) -> dict[str, str]:
    """Keyword arguments of :func:`estimate` from a config's ``plugins`` section.

    Values may be names or ``{name: ..., **options}``; options are ignored (the model prices a
    compressor by its registered defaults). An attention or scheduler the model does not know
    is a ConfigError naming the key.
    """
    plugins = plugins or {}

    def name(key: str, default: str) -> str:
        value = plugins.get(key, default)
        if isinstance(value, dict):
            value = value.get("name", default)
        return str(value)

    out = {
        "attention": name("attention", "gpu"),
        "weight_compression": name("weight_compressor", "none"),
        "cache_compression": name("cache_compressor", "none"),
        "scheduler": name("scheduler", "zigzag"),
    }
    if out["attention"] not in ("gpu", "cpu"):
        raise ConfigError(f"plugins.attention: the cost model prices gpu and cpu attention, not {out['attention']!r}")
    if out["scheduler"] not in ("zigzag", "row"):
        raise ConfigError(f"plugins.scheduler: the cost model prices zigzag and row, not {out['scheduler']!r}")
    return out


def estimate(
    spec: ModelSpec,
    policy: Policy,
    workload: Workload | tuple[int, int],
    hardware: HardwareProfile,
    attention: str = "gpu",
    weight_compression: str | None = None,
    cache_compression: str | None = None,
    scheduler: str = "zigzag",
    dtype: str = "float16",
    memory_only: bool = False,
) -> Estimate:
    """Predict time, bytes, FLOPs and peak memory of generating with ``policy``.

    ``memory_only`` skips the timing (the optimizer's fast feasibility test): phases are empty.

    ``attention``: ``"gpu"`` (decode attention on the compute device: off-device cache is
    fetched to it) or ``"cpu"`` (on the host: a host cache is read in place). Compression:
    ``None``/``"none"``, ``"int4"``, ``"int8"`` (any registered compressor).
    """
    if not isinstance(workload, Workload):
        workload = Workload(*workload)
    if attention not in ("gpu", "cpu"):
        raise ConfigError(f"attention: the cost model knows gpu and cpu, got {attention!r}")
    if scheduler not in ("zigzag", "row"):
        raise ConfigError(f"scheduler: the cost model knows zigzag and row, got {scheduler!r}")
    if dtype not in _DTYPE_SIZE:
        raise ConfigError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}")
    s, n = workload.prompt_len, workload.gen_len
    if s + n > spec.max_positions:
        raise ConfigError(f"prompt_len + gen_len = {s + n} exceeds the model's {spec.max_positions} positions")
    wcomp, ccomp = _normalize_compression(weight_compression), _normalize_compression(cache_compression)

    if hardware.device == "cuda" and not hardware.shared_memory and not policy.pin_weights:
        hardware = _unpinned(hardware)  # host tensors are pageable: slower copies
    hw, rates = hardware, _Rates(hardware, dtype)
    cuda = rates.cuda
    dsize = _DTYPE_SIZE[dtype]
    B, K, L = policy.gpu_batch_size, policy.num_gpu_batches, spec.num_layers
    h, V = spec.hidden_size, spec.vocab_size
    model = arithmetic(spec)  # the family's FLOPs and cache geometry
    ffn = model.ffn

    # Weights, per layer kind (all attention layers alike, all MLP layers alike).
    wpct = policy.percents("weights")
    layers = _place_layers(spec, wcomp, dtype, wpct["gpu"], wpct["cpu"], cuda)
    multiplicity = _layers_of_kind(L)

    # Cache: bytes per token of one unit (k and v), grouped layers with the same tier mix.
    # KV heads, not query heads: a grouped-query model's cache is smaller than its queries.
    cache_token = 2 * stored_bytes((1, B, model.kv_heads, model.head_dim), ccomp, dtype)
    cache_token_raw = B * model.cache_raw * dsize
    cpct = policy.percents("cache")
    cache_groups, cache_units = _cache_groups(L, K, cpct["gpu"], cpct["cpu"])

    # Activations: zig-zag with several GPU batches parks each batch's hidden states in its tier.
    act_tiers = split_by_percent([1] * K, policy.percents("act"))
    parks_act = scheduler == "zigzag" and K > 1
    attention_on_gpu = attention == "gpu"  # attention device is the compute device
    # per layer kind: (link seconds, decompression seconds) of one load of its weights
    weight_load: dict[str, tuple[float, float]] = {}

    def stores_async(tier: str, prefill: bool) -> bool:
        """Cache writes the store stream overlaps with compute: to pinned CPU memory on CUDA,
        unless CPU attention reads them at once (decode), when the host waits for them."""
        return cuda and policy.overlap and policy.pin_weights and tier == "cpu" and (prefill or attention_on_gpu)

    def resident_where_attended(tier: str) -> bool:
        if not cuda:  # one memory: gpu and cpu tiers are both where compute runs
            return tier != "disk"
        return tier == ("gpu" if attention_on_gpu else "cpu")

    def phase(prefill: bool, t: float, steps: int) -> PhaseCost:
        """Cost of ``steps`` steps with ``t`` tokens already in the cache (0 for prefill)."""
        tokens = s if prefill else 1
        out = PhaseCost(steps=steps)
        # Per model layer kind, what the layer itself costs: [(how many such layers, loads of its
        # cache and activations, compute + synchronous stores + overhead, stores on the store
        # stream)]; the weights it loads for the *next* layer are paired with it below.
        own: dict[str, list[tuple[int, float, float, float]]] = {}
        for kind in ("embed", "attn", "mlp", "head"):
            lw = layers[kind]
            # Loads of this layer's weights (weight I/O thread), ``reloads`` times per step.
            wbytes = dict.fromkeys(LINKS, 0.0)
            if not lw.resident:
                for tier in ("cpu", "disk"):
                    _move(wbytes, tier, True, lw.loaded[tier], cuda)
            reloads = 1 if (scheduler == "zigzag" or lw.resident) else K
            for link in LINKS:
                wbytes[link] *= reloads
            w_decompress = reloads * (rates.codec(lw.decompressed_raw, False) if not lw.resident else 0.0)
            w_load_s = _link_seconds(wbytes, hw)
            weight_load[kind] = (w_load_s / reloads, w_decompress / reloads)

            # Compute per GPU batch.
            if kind == "embed":
                flops = B * tokens * model.flops["embed"] if model.flops["embed"] else 0.0
                touched = B * tokens * h * dsize * 2 + (model.flops["embed"] // 2 * dsize)
            elif kind == "attn":
                flops = B * tokens * model.flops["attn"]
                touched = lw.raw_total + 6 * B * tokens * h * dsize
            elif kind == "mlp":
                flops = B * tokens * model.flops["mlp"]
                touched = lw.raw_total + 2 * B * tokens * (h + ffn) * dsize
            else:
                flops = B * model.flops["head"]  # the last position of each sequence only
                touched = lw.raw_total + B * V * 4
            gpu_s = rates.gpu_op(flops, touched)
            gpu_flops = flops

            # Activations parked between tasks (zig-zag, several GPU batches).
            act_load = dict.fromkeys(LINKS, 0.0)
            act_store = dict.fromkeys(LINKS, 0.0)
            # The embedding rows of each GPU batch's tokens, gathered where their table lives.
            for tier, row, compressed in lw.gathered:
                rows = (B * tokens, *row)
                for _ in range(K):
                    _move(act_load, tier, True, stored_bytes(rows, wcomp if compressed else "none", dtype), cuda)
                if compressed:
                    gpu_s += rates.codec(math.prod(rows) * dsize, False)
            if parks_act:
                hidden = B * tokens * h * dsize
                for k in range(K):
                    if kind != "head":
                        _store(act_store, act_tiers[k], hidden, cuda)
                    if kind != "embed":
                        _move(act_load, act_tiers[k], True, hidden, cuda)

            groups = cache_groups.items() if kind == "attn" else [((), multiplicity[kind])]
            own[kind] = []
            for mix, count in groups:
                c_load = dict.fromkeys(LINKS, 0.0)
                c_store = dict.fromkeys(LINKS, 0.0)
                c_store_async = dict.fromkeys(LINKS, 0.0)
                att_gpu_s = att_cpu_s = extra_load_s = extra_store_s = 0.0
                att_gpu_flops = att_cpu_flops = 0.0
                for tier, units in mix:
                    if prefill:
                        # SDPA over the prompt on the compute device; the prompt's k, v written home.
                        fl = B * s * model.keys(s) * model.attention_per_key
                        att_gpu_flops += units * fl
                        att_gpu_s += units * rates.gpu_op(fl, 4 * B * s * h * dsize)
                        _store(c_store_async if stores_async(tier, prefill) else c_store, tier, units * s * cache_token, cuda)
                        if ccomp != "none":
                            att_gpu_s += units * rates.codec(s * cache_token_raw, False)
                        continue
                    # Under a sliding window a decode step reads (and fetches) only the window.
                    keys = model.keys(t)
                    fl = B * keys * model.attention_per_key
                    on_host = not attention_on_gpu  # CPU attention (on the host)
                    here = resident_where_attended(tier)
                    if not here:
                        _move(c_load, tier, not on_host, units * keys * cache_token, cuda)
                        # the fetched prefix is concatenated with the new token where attention runs
                        copy_s = units * rates.mem_pass(2 * keys * cache_token_raw, on_host)
                        att_cpu_s, att_gpu_s = (att_cpu_s + copy_s, att_gpu_s) if on_host else (att_cpu_s, att_gpu_s + copy_s)
                    if ccomp != "none":
                        # decompressed where attention runs (on the cache I/O thread when fetched, but on
                        # the same processor as the compute, so it is counted there)
                        codec_s = units * rates.codec(keys * cache_token_raw, on_host)
                        att_cpu_s, att_gpu_s = (att_cpu_s + codec_s, att_gpu_s) if on_host else (att_cpu_s, att_gpu_s + codec_s)
                    if on_host:
                        att_cpu_flops += units * fl
                        att_cpu_s += units * fl / hw.cpu_attention_flops
                        if cuda:  # q to the host, the output back (not counted by the engine's stats)
                            extra_load_s += units * B * h * dsize / hw.d2h_bandwidth
                            extra_store_s += units * B * h * dsize / hw.h2d_bandwidth
                    else:
                        att_gpu_flops += units * fl
                        att_gpu_s += units * rates.gpu_op(fl, 2 * keys * cache_token_raw)
                    _store(c_store_async if stores_async(tier, prefill) else c_store, tier, units * cache_token, cuda)

                loads = dict(wbytes)
                stores = dict.fromkeys(LINKS, 0.0)
                for link in LINKS:
                    loads[link] += act_load[link] + c_load[link]
                    stores[link] += act_store[link] + c_store[link]
                load_s = _link_seconds(act_load, hw) + _link_seconds(c_load, hw) + extra_load_s
                store_s = _link_seconds(stores, hw) + extra_store_s
                compute_s = K * gpu_s + att_gpu_s + att_cpu_s
                overhead_s = K * hw.task_overhead_s
                own[kind].append((count, load_s, compute_s + store_s + overhead_s, _link_seconds(c_store_async, hw)))
                for link in LINKS:
                    out.bytes[link] += count * (loads[link] + stores[link] + c_store_async[link])
                out.gpu_flops += count * (K * gpu_flops + att_gpu_flops)
                out.cpu_flops += count * att_cpu_flops
                out.times["gpu_compute"] += count * (K * gpu_s + att_gpu_s + w_decompress)
                out.times["cpu_compute"] += count * att_cpu_s
                out.times["overhead"] += count * overhead_s
        predicted = _step_seconds(own, weight_load, 1 if scheduler == "zigzag" else K, L, policy.overlap)
        out.times["disk->cpu"] = out.bytes["disk->cpu"] / hw.disk_read_bandwidth
        out.times["cpu->gpu"] = out.bytes["cpu->gpu"] / hw.h2d_bandwidth
        out.times["gpu->cpu"] = out.bytes["gpu->cpu"] / hw.d2h_bandwidth
        out.times["cpu->disk"] = out.bytes["cpu->disk"] / hw.disk_write_bandwidth
        # scale one step to the phase
        for link in LINKS:
            out.bytes[link] *= steps
        for key in out.times:
            out.times[key] *= steps
        out.gpu_flops *= steps
        out.cpu_flops *= steps
        out.predicted_s = predicted * steps
        return out

    if memory_only:
        prefill_cost, decode_cost = PhaseCost(steps=1), PhaseCost(steps=n - 1)
    else:
        prefill_cost = phase(True, 0.0, 1)
        decode_cost = phase(False, s + n / 2, n - 1) if n > 1 else PhaseCost(steps=0)

    memory = _memory(
        spec, policy, layers, cache_units, cache_token, act_tiers, parks_act, s, n, dsize, attention_on_gpu, cuda,
        resident_where_attended, ccomp, cache_token_raw, ffn,
    )
    if workload.num_prompts is None:
        blocks, generated = 1, policy.block_size * n
    else:
        blocks, generated = math.ceil(workload.num_prompts / policy.block_size), workload.num_prompts * n
    return Estimate(
        policy=policy,
        plugins={"attention": attention, "weight_compressor": wcomp, "cache_compressor": ccomp, "scheduler": scheduler},
        workload=workload,
        hardware_name=hardware.name,
        dtype=dtype,
        prefill=prefill_cost,
        decode=decode_cost,
        memory=memory,
        num_blocks=blocks,
        generated_tokens=generated,
    )


def _step_seconds(own: dict[str, list[tuple[int, float, float, float]]], weight_load: dict[str, tuple[float, float]],
                  reloads: int, L: int, overlap: bool) -> float:
    """Predicted seconds of one step, from each layer's own costs and its weights' load.

    As the engine schedules it: the weights of the next layer in the order load (and are
    decompressed) while the current layer computes, every GPU batch of it, on their own I/O
    thread; cache and activation loads of the current layer run beside them on the other I/O
    thread, cache stores to pinned memory on the store stream. So a layer takes
    max(its cache and activation loads + the next layer's weight load, its compute + the next
    layer's decompression + synchronous stores + overhead, its asynchronous stores). The
    first layer's weights load before anything computes. With the row schedule every GPU
    batch runs through all layers, so each load happens ``reloads`` (= GPU batches) times and
    the head's batches also load the embedding of the batch after them. Without overlap,
    everything adds up.
    """
    if not overlap:
        per_step = _layers_of_kind(L)
        weights = sum(per_step[kind] * reloads * (io + decompress) for kind, (io, decompress) in weight_load.items())
        return weights + sum(n * (load + busy + stored) for entries in own.values() for n, load, busy, stored in entries)
    embed_io, embed_decompress = weight_load["embed"]
    total = embed_io + embed_decompress
    # (layer kind, how many of it, or None for the counts of its entries; the kind loading meanwhile)
    for kind, times, ahead in (("embed", None, "attn"), ("attn", None, "mlp"), ("mlp", L - 1, "attn"), ("mlp", 1, "head")):
        io, decompress = (reloads * x for x in weight_load[ahead])
        for count, load, busy, stored in own[kind]:
            total += (count if times is None else times) * max(load + io, busy + decompress, stored)
    for count, load, busy, stored in own["head"]:
        total += count * max(load + (reloads - 1) * embed_io, busy + (reloads - 1) * embed_decompress, stored)
    return total


def _memory(spec, policy, layers, cache_units, cache_token, act_tiers, parks_act, s, n, dsize, attention_on_gpu, cuda,
            resident_where_attended, ccomp, cache_token_raw, ffn) -> dict[str, dict[str, float]]:
    """Peak bytes per tier (see the module docstring for what is counted).

    Resident tensors count their stored bytes, pinned or not: the CPU tier page-locks its own
    allocations in place (``cudaHostRegister``), so pinning costs no extra RAM. Pinning only
    changes copy bandwidth, which :func:`estimate` prices.
    """
    B = policy.gpu_batch_size
    h, H, V = spec.hidden_size, spec.num_heads, spec.vocab_size
    T = s + n
    mem = {tier: dict.fromkeys(("weights", "cache", "act", "staging", "working"), 0.0) for tier in ("gpu", "cpu", "disk")}
    counts = _layers_of_kind(spec.num_layers)
    for kind, lw in layers.items():
        for tier in ("gpu", "cpu", "disk"):
            mem[tier]["weights"] += counts[kind] * lw.stored[tier]
    unit_bytes = T * cache_token
    for tier, units in cache_units.items():
        mem[tier]["cache"] += units * unit_bytes
    if parks_act:
        for tier in act_tiers:
            mem[tier]["act"] += B * s * h * dsize

    # Staging on the compute device: the current and the prefetched next layer's fetched weights.
    fetched = sorted((0 if lw.resident else lw.raw_fetched) for lw in layers.values())
    staging = fetched[-1] + fetched[-2]
    # Decode cache prefixes brought to the attention device: the prefetched one, the current
    # one and its concatenation with the new token; a compressed resident cache is decompressed.
    raw_unit = T * cache_token_raw
    fetched_cache = any(not resident_where_attended(t) for t in cache_units)
    cache_stage = 3 * raw_unit if fetched_cache else (raw_unit if ccomp != "none" else 0)
    working = max(
        # prefill attention: x, q, k, v, output, new x; the scores where SDPA materialises them (CPU)
        6 * B * s * h * dsize + (B * H * s * s * 4 if not cuda else 0) + B * s * s,
        # prefill MLP: x, fc1 output and its activation, new x
        2 * B * s * h * dsize + 2 * B * s * ffn * dsize,
    ) + B * V * 4 + 2 * B * s * h * dsize  # logits (float32) and the K/V compressed on their way home
    # Group-wise decompression works in float32 and casts at the end: besides its output, about
    # 2.5x the output's bytes are alive at once (flexgen/compression/groupwise.py).
    codec_weights = 2.5 * max(lw.largest_compressed for lw in layers.values())
    codec_cache = 2.5 * raw_unit / 2 if ccomp != "none" else 0
    mem["gpu"]["staging"] += staging
    mem["gpu"]["working"] += working + max(codec_weights, codec_cache if (attention_on_gpu or not cuda) else 0)
    if ccomp != "none" and cuda and not attention_on_gpu:
        mem["cpu"]["working"] += codec_cache
    if attention_on_gpu or not cuda:
        mem["gpu"]["staging"] += cache_stage
    else:
        # CPU attention: the cache prefix converted to float32, and the scores.
        mem["cpu"]["staging"] += cache_stage + raw_unit // dsize * 4 + B * H * T * 4
    for parts in mem.values():
        parts["total"] = sum(parts.values())
    return mem
