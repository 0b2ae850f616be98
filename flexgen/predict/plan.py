"""``flexgen plan --config FILE [key=value ...] [--json]`` (also ``flexgen predict --dry-run``):
the plan of a run, shown before anything runs.

It resolves what ``flexgen predict`` would (the model, the prompts, the policy with ``policy:
auto`` resolved by the cost model, the plugins) and prints, without loading weights, generating
or writing anything:

* the resolved policy and plugins;
* which tier holds each layer's weights, and how many bytes (the engine's own placement rule,
  :func:`flexgen.policy.split_by_percent` over each model layer's tensors, and the weight
  compressor's own byte count);
* where each GPU batch's KV cache and activations live, and their bytes;
* the cost model's predicted peak memory per tier, whether that fits the machine, and its
  predicted throughput (with the roofline bound beside it).

The machine is the one ``policy: auto`` plans for: ``hardware.profile`` (a preset or a file),
or this machine measured once and cached, with the ``hardware.*_memory`` caps applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flexgen.config import FlexGenConfig, resolve_offload_dir
from flexgen.errors import ConfigError
from flexgen.policy import TIERS, Policy, split_by_percent


@dataclass
class RunPlanView:
    """What :func:`make_plan` found; :meth:`to_dict` is the ``--json`` output."""

    model: str
    dtype: str
    device: str
    num_prompts: int
    prompt_len: int
    gen_len: int
    policy: Policy
    policy_source: str
    plugins: dict[str, Any]
    offload_dir: str
    weights: list[dict[str, Any]]  # one per model layer: layer, kind, decoder_layer, tensors/bytes per tier
    cache: list[dict[str, Any]]  # one per GPU batch: decoder layers and bytes per tier
    activations: list[dict[str, Any]]  # one per GPU batch: tier, bytes
    hardware: dict[str, Any]
    predicted: dict[str, Any] | None = None  # the cost model's estimate; None when it cannot price the plugins
    fits: list[str] = field(default_factory=list)  # what does not fit (empty: it fits)
    note: str | None = None

    def weight_totals(self) -> dict[str, int]:
        return {tier: sum(row["bytes"][tier] for row in self.weights) for tier in TIERS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dtype": self.dtype, "device": self.device,
            "workload": {"num_prompts": self.num_prompts, "prompt_len": self.prompt_len, "gen_len": self.gen_len},
            "policy": self.policy.to_dict(), "policy_source": self.policy_source, "plugins": self.plugins,
            "offload_dir": self.offload_dir,
            "weights": self.weights, "weights_total_bytes": self.weight_totals(),
            "cache": self.cache, "activations": self.activations,
            "hardware": self.hardware, "predicted": self.predicted, "does_not_fit": self.fits, "note": self.note,
        }


def weight_rows(spec: Any, policy: Policy, weight_compressor: Any, dtype: str) -> list[dict[str, Any]]:
    """Per model layer, how many of its tensors, and how many bytes, each tier holds.

    The engine's own rule (:func:`flexgen.policy.split_by_percent` over each layer's tensors)
    and the weight compressor's own byte count; vectors (biases, norms) are stored uncompressed.
    """
    from flexgen import registry
    from flexgen.engine import DTYPES
    from flexgen.models.families import family_for_spec

    family = family_for_spec(spec)
    compressor = registry.create("compressor", weight_compressor, where="plugins.weight_compressor")
    identity = registry.create("compressor", "none")
    rows = []
    for index in range(spec.num_model_layers):
        specs = family.layer_weights(spec, index)
        tiers = split_by_percent([math.prod(w.shape) for w in specs], policy.percents("weights"))
        kind, decoder_layer = family.layer_kind(spec, index)
        row = {"layer": index, "kind": kind, "decoder_layer": decoder_layer,
               "tensors": dict.fromkeys(TIERS, 0), "bytes": dict.fromkeys(TIERS, 0)}
        for weight, tier in zip(specs, tiers):
            packer = compressor if len(weight.shape) >= 2 else identity
            row["tensors"][tier] += 1
            row["bytes"][tier] += int(packer.nbytes(tuple(weight.shape), DTYPES[dtype]))
        rows.append(row)
    return rows


def make_plan(cfg: FlexGenConfig) -> RunPlanView:
    """Resolve a config as ``flexgen predict`` would, and place every tensor on paper."""
    import torch

    from flexgen import registry
    from flexgen.engine import DTYPES, default_offload_dir
    from flexgen.planner.costmodel import Workload, estimate, estimate_options
    from flexgen.planner.hardware import get_hardware
    from flexgen.planner.optimizer import violations
    from flexgen.predict.data import load_prompts
    from flexgen.predict.resolve import _accelerator, load_tokenizer, resolve_model, resolve_policy

    cfg.resolve_dtype("cuda" if _accelerator(cfg) == "gpu" else "cpu")
    model, model_dir, spec = resolve_model(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    prompts = load_prompts(cfg, tokenizer, spec)
    policy, plugins, info = resolve_policy(cfg, spec, prompts)
    dtype = DTYPES[cfg.model.dtype]
    cache_compressor = registry.create("compressor", plugins["cache_compressor"], where="plugins.cache_compressor")
    device = "cuda" if _accelerator(cfg) == "gpu" else "cpu"
    prompt_len = max(len(p.input_ids) for p in prompts)
    gen_len = cfg.generation.max_new_tokens
    weights = weight_rows(spec, policy, plugins["weight_compressor"], cfg.model.dtype)

    L, K, B = spec.num_layers, policy.num_gpu_batches, policy.gpu_batch_size
    from flexgen.models.families import family_for_spec

    geometry = family_for_spec(spec).cache_geometry(spec, 0)  # KV heads, as the engine's cache units hold them
    unit_bytes = 2 * int(cache_compressor.nbytes((prompt_len + gen_len, B, geometry.num_kv_heads, geometry.head_dim),
                                                 dtype))
    cache_tiers = split_by_percent([1] * (L * K), policy.percents("cache"))
    cache = []
    for batch in range(K):
        layers = dict.fromkeys(TIERS, 0)
        for layer in range(L):
            layers[cache_tiers[layer * K + batch]] += 1
        cache.append({"batch": batch, "layers": layers, "bytes": {t: n * unit_bytes for t, n in layers.items()}})
    act_bytes = B * prompt_len * spec.hidden_size * torch.empty((), dtype=dtype).element_size()
    activations = [{"batch": k, "tier": tier, "bytes": act_bytes}
                   for k, tier in enumerate(split_by_percent([1] * K, policy.percents("act")))]

    hardware = get_hardware(cfg.hardware.profile, device=device, **cfg.hardware_caps())
    view = RunPlanView(
        model=spec.name if cfg.model.synthetic is None else f"{cfg.model.synthetic} (synthetic, seed {cfg.model.seed})",
        dtype=cfg.model.dtype, device=device, num_prompts=len(prompts), prompt_len=prompt_len, gen_len=gen_len,
        policy=policy, policy_source=info["source"], plugins=plugins,
        offload_dir=str(resolve_offload_dir(cfg) or default_offload_dir()),
        weights=weights, cache=cache, activations=activations,
        hardware={"name": hardware.name, "source": hardware.source,
                  "capacity": {t: getattr(hardware, f"{t}_memory") for t in TIERS}},
    )
    try:
        options = estimate_options(plugins)
    except ConfigError as exc:
        view.note = f"no prediction: {exc}"
        return view
    est = estimate(spec, policy, Workload(prompt_len, gen_len, len(prompts)), hardware, dtype=cfg.model.dtype,
                   **options)
    view.predicted = est.to_dict()
    view.fits = violations(est, hardware, {"gpu": 1.0, "cpu": 1.0, "disk": 1.0})
    return view


# --------------------------------------------------------------------------- printing


def _size(n: float) -> str:
    from flexgen.planner.hardware import format_bytes

    return format_bytes(n) if n else "-"


def _tiers(values: dict[str, float], fmt=_size) -> str:
    return "  ".join(f"{tier} {fmt(values[tier]):>9}" for tier in TIERS)


def _weight_lines(view: RunPlanView) -> list[str]:
    """Per decoder layer (attention + MLP), runs of identical rows folded: a 96-layer model stays readable."""
    rows: list[tuple[str, dict[str, int], dict[str, int]]] = []
    by_decoder: dict[int, list[dict[str, Any]]] = {}
    for row in view.weights:
        if row["decoder_layer"] < 0:
            rows.append((row["kind"], row["bytes"], row["tensors"]))
        else:
            by_decoder.setdefault(row["decoder_layer"], []).append(row)
            if len(by_decoder[row["decoder_layer"]]) == 2:
                pair = by_decoder[row["decoder_layer"]]
                rows.append((f"decoder {row['decoder_layer']}", {t: sum(r["bytes"][t] for r in pair) for t in TIERS},
                             {t: sum(r["tensors"][t] for r in pair) for t in TIERS}))
    lines, start = [], 0
    while start < len(rows):
        end = start
        while (end + 1 < len(rows) and rows[end + 1][0].startswith("decoder") and rows[start][0].startswith("decoder")
               and rows[end + 1][1:] == rows[start][1:]):
            end += 1
        name = rows[start][0] if end == start else f"decoders {rows[start][0].split()[1]}-{rows[end][0].split()[1]}"
        each = " each" if end > start else ""
        lines.append(f"    {name:<16} {_tiers(rows[start][1])}{each}")
        start = end + 1
    lines.append(f"    {'total':<16} {_tiers(view.weight_totals())}")
    return lines


def format_plan(view: RunPlanView) -> str:
    """The lines ``flexgen plan`` prints."""
    p = view.policy
    names = {k: (v.get("name") if isinstance(v, dict) else v) for k, v in view.plugins.items() if k != "storage"}
    pct = {kind: p.percents(kind) for kind in ("weights", "cache", "act")}
    lines = [
        f"flexgen plan: {view.model}, {view.dtype}, on {view.device}; {view.num_prompts} prompts of up to "
        f"{view.prompt_len} tokens, {view.gen_len} new tokens each",
        f"  policy ({view.policy_source}): block {p.num_gpu_batches} x {p.gpu_batch_size} = {p.block_size} sequences; "
        "gpu/cpu/disk % " + ", ".join(f"{kind} {pct[kind]['gpu']:g}/{pct[kind]['cpu']:g}/{pct[kind]['disk']:g}"
                                      for kind in ("weights", "cache", "act"))
        + f"; overlap {p.overlap}, pin {p.pin_weights}",
        f"  plugins: attention {names.get('attention')}, scheduler {names.get('scheduler')}, compression weights "
        f"{names.get('weight_compressor')} / cache {names.get('cache_compressor')}",
        "  weights (bytes per tier):",
        *_weight_lines(view),
    ]
    if view.weight_totals()["disk"]:
        lines.append(f"    disk-tier weights live in {view.offload_dir} (converted once, then reused)")
    lines.append(f"  KV cache per GPU batch ({view.prompt_len + view.gen_len} positions; decoder layers, bytes per tier):")
    for row in view.cache:
        layers = ", ".join(f"{tier} {n} layers" for tier, n in row["layers"].items() if n)
        lines.append(f"    batch {row['batch']}: {layers} ({', '.join(f'{t} {_size(b)}' for t, b in row['bytes'].items() if b)})")
    lines.append("  activations per GPU batch: " + ", ".join(
        f"batch {row['batch']} {row['tier']} ({_size(row['bytes'])})" for row in view.activations))
    hw = view.hardware
    lines.append(f"  machine: {hw['name']} [{hw['source']}]: " + ", ".join(
        f"{t} {_size(hw['capacity'][t])}" for t in TIERS))
    if view.predicted is None:
        lines.append(f"  {view.note}")
        return "\n".join(lines)
    est = view.predicted
    lines.append("  predicted peak memory: " + ", ".join(f"{t} {_size(est['peak_memory'][t])}" for t in TIERS)
                 + ("; fits" if not view.fits else f"; DOES NOT FIT: {'; '.join(view.fits)}"))
    lines.append(
        f"  predicted throughput: {est['predicted_throughput']:.1f} tok/s total (bound {est['bound_throughput']:.1f}); "
        f"prefill {est['prefill_throughput']:.1f}, decode {est['decode_throughput']:.1f} tok/s; "
        f"{est['num_blocks']} block(s), {est['predicted_time_s']:.1f} s"
    )
    return "\n".join(lines)


