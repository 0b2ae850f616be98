"""What a predict run reports: the metrics JSON beside the output, and the few lines printed at the end.

Rank 0 builds the metrics from every rank's engine stats and writes them atomically
(:func:`flexgen.atomic.write_json_atomic`); the summary printed (and returned by
:func:`flexgen.predict.run.run_predict`) is read back from those metrics, so the two never
disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexgen.config import FlexGenConfig
from flexgen.policy import Policy
from flexgen.predict.resolve import RunPlan


def summary_base(plan: RunPlan) -> dict[str, Any]:
    return {
        "output": str(plan.out_path),
        "metrics": f"{plan.out_path}.metrics.json",
        "prompts_total": len(plan.prompts),
        "prompts_skipped": 0,
        "prompts_generated": 0,
        "tokens_generated": 0,
        "policy": plan.policy.to_dict(),
        "policy_source": plan.policy_info["source"],
    }


def build_metrics(cfg: FlexGenConfig, plan: RunPlan, ranks: list[dict[str, Any]], info: dict[str, Any],
                  wall_time_s: float) -> dict[str, Any]:
    """The metrics JSON: the ranks' engine figures aggregated, then each rank's own.

    ``wall_throughput`` is the tokens of all ranks over the longest rank's predict loop (what
    the user waits for, Lightning's overhead included); ``total_throughput`` is FlexGen's
    engine-time figure (see :func:`~flexgen.predict.distributed.aggregate_stats`).
    """
    from flexgen.predict.distributed import aggregate_stats

    stats = aggregate_stats([r["stats"] for r in ranks])
    generated = sum(r["prompts_generated"] for r in ranks)
    tokens = sum(r["tokens_generated"] for r in ranks)
    loop_time = max(r["loop_time_s"] for r in ranks)
    policy: Policy = info["policy"]
    from flexgen import __version__

    return {
        "flexgen_version": __version__,
        **stats,
        "wall_time_s": wall_time_s,
        "wall_throughput": tokens / loop_time if loop_time > 0 else 0.0,
        "prompts": {"prompts_total": len(plan.prompts), "prompts_skipped": info["prompts_skipped"],
                    "prompts_generated": generated},
        "tokens_generated": tokens,
        "world_size": info["world_size"],
        "ranks": ranks,
        "policy": policy.to_dict(),
        "policy_source": info["policy_info"]["source"],
        "predicted_throughput": info["policy_info"].get("predicted_throughput"),
        "hardware": info["policy_info"].get("hardware"),
        "plugins": info["plugins"],
        "device": ranks[0]["device"],
        "model": {"source": plan.model, "spec": plan.spec.to_dict()},
        "config": cfg.to_dict(),
    }


def summary_from_metrics(plan: RunPlan, metrics: dict[str, Any], metrics_path: Path) -> dict[str, Any]:
    """What the CLI prints (and ``run_predict`` returns), from rank 0's metrics."""
    engine_keys = ("prefill_time_s", "decode_time_s", "prompt_tokens", "generated_tokens", "prefill_throughput",
                   "decode_throughput", "total_throughput", "bytes_moved", "peak_memory", "compression", "threads",
                   "dtype", "compute_dtype", "cpu_products", "attention_kernel")
    return {
        **summary_base(plan),
        **metrics["prompts"],
        "tokens_generated": metrics["tokens_generated"],
        "policy": metrics["policy"],
        "policy_source": metrics["policy_source"],
        "metrics": str(metrics_path),
        "complete": True,
        "wall_time_s": metrics["wall_time_s"],
        "wall_throughput": metrics["wall_throughput"],
        "world_size": metrics["world_size"],
        "stats": {k: metrics[k] for k in engine_keys if k in metrics},
        "rank": 0,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines printed at the end of a run."""
    lines = []
    skipped = summary["prompts_skipped"]
    if summary["prompts_generated"] == 0 and skipped == summary["prompts_total"]:
        lines.append(f"flexgen predict: all {skipped} prompts are already in the output; nothing to do")
    else:
        lines.append(
            f"flexgen predict: {summary['prompts_generated']} prompts generated ({skipped} already done), "
            f"{summary['tokens_generated']} new tokens in {summary['wall_time_s']:.1f} s"
        )
    stats = summary.get("stats") or {}
    generated = summary["prompts_generated"] > 0
    if stats and generated:
        lines.append(
            "  throughput: {:.1f} tok/s total (prefill {:.1f}, decode {:.1f}); engine time {:.2f} s prefill + {:.2f} s decode".format(
                stats.get("total_throughput", 0.0), stats.get("prefill_throughput", 0.0),
                stats.get("decode_throughput", 0.0), stats.get("prefill_time_s", 0.0), stats.get("decode_time_s", 0.0),
            )
        )
    p = summary["policy"]
    lines.append(
        f"  policy ({summary['policy_source']}): block {p['num_gpu_batches']} x {p['gpu_batch_size']}; "
        f"gpu/cpu/disk % weights {_tiers(p, 'weights')}, cache {_tiers(p, 'cache')}, activations {_tiers(p, 'act')}"
    )
    if generated and stats.get("dtype") and stats.get("compute_dtype") not in (None, stats["dtype"]):
        lines.append(f"  dtype: {stats['dtype']}, computed in {stats['compute_dtype']} (no native {stats['dtype']} "
                     "matrix instructions on this CPU)")
    if generated and stats.get("cpu_products"):
        lines.append(f"  {stats['cpu_products']}")
    if generated and stats.get("attention_kernel"):
        lines.append(f"  {stats['attention_kernel']}")
    threads = stats.get("threads") if generated else None
    if threads:
        from flexgen.threads import ThreadChoice

        lines.append(f"  {ThreadChoice.from_dict(threads).describe()}")
    if summary.get("world_size", 1) > 1 and generated:
        lines.append(f"  processes: {summary['world_size']}, together {summary['wall_throughput']:.1f} tok/s over the "
                     "predict loop (per-rank figures in the metrics)")
    lines.append(f"  output:  {summary['output']}")
    if stats:
        lines.append(f"  metrics: {summary['metrics']}")
    return "\n".join(lines)


def _tiers(p: dict[str, Any], kind: str) -> str:
    gpu, cpu = p[f"{kind}_gpu"], p[f"{kind}_cpu"]
    return f"{gpu:g}/{cpu:g}/{100 - gpu - cpu:g}"
