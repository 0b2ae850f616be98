"""``flexgen policy --model NAME --prompt-len P --gen-len G``: the cost model's choice of policy.

The search is :func:`flexgen.planner.optimizer.auto_policy`; this is the command around it:
its options, the machine to plan for, and the answer as text or JSON (optionally beside a
grid of hand-written policies, priced the same way).
"""

from __future__ import annotations

import json

from flexgen.cli.args import ArgParser
from flexgen.errors import ConfigError
from flexgen.planner.costmodel import Workload, estimate, estimate_options
from flexgen.planner.hardware import format_bytes, get_hardware
from flexgen.planner.optimizer import (
    ATTENTIONS, GPU_BATCH_SIZES, NUM_GPU_BATCHES, PolicyChoice, auto_policy, hand_written_grid, load_spec, violations,
)


def _csv(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"{option}: expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return values


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{option}: expected a comma-separated list of integers >= 1, got {text!r}")
    return values


def format_choice(choice: PolicyChoice) -> str:
    """The human-readable answer of ``flexgen policy``."""
    p, est, hw = choice.policy, choice.estimate, choice.hardware
    lines = []
    if hw is not None:
        lines.append(
            f"hardware: {hw.name} ({hw.source}); gpu {format_bytes(hw.gpu_memory)}, cpu {format_bytes(hw.cpu_memory)}, "
            f"disk {format_bytes(hw.disk_memory)}"
        )
    lines += [
        f"policy: gpu_batch_size={p.gpu_batch_size} num_gpu_batches={p.num_gpu_batches} "
        f"weights gpu/cpu/disk={p.weights_gpu:g}/{p.weights_cpu:g}/{100 - p.weights_gpu - p.weights_cpu:g} "
        f"cache={p.cache_gpu:g}/{p.cache_cpu:g}/{100 - p.cache_gpu - p.cache_cpu:g} "
        f"act={p.act_gpu:g}/{p.act_cpu:g}/{100 - p.act_gpu - p.act_cpu:g} pin_weights={p.pin_weights}",
        "plugins: " + ", ".join(f"{k}={v}" for k, v in choice.plugins.items()),
        est.describe(),
        f"(searched {choice.considered} placements)",
        "config:",
        "  policy:",
        *[f"    {k}: {v}" for k, v in p.to_dict().items()],
        "  plugins:",
        *[f"    {k}: {v}" for k, v in choice.plugins.items()],
    ]
    return "\n".join(lines)


def policy_command(argv: list[str]) -> int:
    """``flexgen policy --model NAME --prompt-len P --gen-len G [--hardware FILE|preset] [--json]``."""

    parser = ArgParser(
        prog="flexgen policy",
        description="Choose the offloading policy with the highest predicted throughput that fits the machine.",
    )
    parser.add_argument("--model", required=True, help="a model size of any family (opt-30b, llama-3.1-70b) or an HF checkpoint directory")
    parser.add_argument("--prompt-len", type=int, required=True, help="prompt length in tokens (the longest prompt)")
    parser.add_argument("--gen-len", type=int, required=True, help="new tokens generated per prompt")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts in the run (caps the block size)")
    parser.add_argument("--hardware", default=None,
                        help="a hardware YAML file or a preset (t4-paper, h200); default: measure this machine (cached)")
    parser.add_argument("--gpu-memory", default=None, help="cap the GPU memory, e.g. 24GiB")
    parser.add_argument("--cpu-memory", default=None, help="cap the CPU memory, e.g. 200GB")
    parser.add_argument("--disk-memory", default=None, help="cap the disk space, e.g. 1.5TB")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype of weights and cache, which sets their bytes (default: float16)")
    parser.add_argument("--attention", default="gpu,cpu", help="attention locations to consider (gpu,cpu)")
    parser.add_argument("--compression", default="none,int4",
                        help="weight and cache compressions to consider (none,int4,int8)")
    parser.add_argument("--gpu-batch-sizes", default=None, help="candidate GPU batch sizes, e.g. 8,16,32")
    parser.add_argument("--num-gpu-batches", default=None, help="candidate numbers of GPU batches, e.g. 1,2,4")
    parser.add_argument("--grid", action="store_true",
                        help="also price a grid of hand-written policies beside the choice")
    parser.add_argument("--json", action="store_true", help="print the choice as JSON")
    args = parser.parse_args(argv)

    for key in ("prompt_len", "gen_len"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    spec = load_spec(args.model)
    hardware = get_hardware(args.hardware, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                            disk_memory=args.disk_memory)
    compressions = _csv(args.compression, ("none", "int4", "int8"), "--compression")
    choice = auto_policy(
        spec, args.prompt_len, args.gen_len, hardware, args.num_prompts,
        dtype=args.dtype,
        attentions=_csv(args.attention, ATTENTIONS, "--attention"),
        weight_compressions=compressions,
        cache_compressions=compressions,
        gpu_batch_sizes=_ints(args.gpu_batch_sizes, "--gpu-batch-sizes") if args.gpu_batch_sizes else GPU_BATCH_SIZES,
        num_gpu_batches=_ints(args.num_gpu_batches, "--num-gpu-batches") if args.num_gpu_batches else NUM_GPU_BATCHES,
    )
    grid = []
    if args.grid:
        workload = Workload(args.prompt_len, args.gen_len, args.num_prompts)
        for policy, plugins in hand_written_grid():
            est = estimate(spec, policy, workload, hardware, dtype=args.dtype, **estimate_options(plugins))
            grid.append((policy, plugins, est, violations(est, hardware)))
    if args.json:
        out = choice.to_dict()
        out["model"] = spec.name
        if args.grid:
            out["grid"] = [
                {"policy": p.to_dict(), "plugins": pl, "predicted_throughput": e.predicted_throughput, "fits": not v,
                 "over": v}
                for p, pl, e, v in grid
            ]
        print(json.dumps(out, indent=1))
    else:
        print(f"model: {spec.name}, prompt {args.prompt_len}, generate {args.gen_len}" +
              (f", {args.num_prompts} prompts" if args.num_prompts else ""))
        print(format_choice(choice))
        if grid:
            print("hand-written grid (predicted token/s; * = does not fit):")
            for p, pl, e, v in grid:
                mark = "*" if v else " "
                print(f"  {mark}{e.predicted_throughput:10.2f}  gbs={p.gpu_batch_size:<3} x{p.num_gpu_batches:<2} "
                      f"weights={p.weights_gpu:g}/{p.weights_cpu:g} cache={p.cache_gpu:g}/{p.cache_cpu:g} "
                      f"attention={pl['attention']} w={pl['weight_compressor']} c={pl['cache_compressor']}"
                      + (f"  ({'; '.join(v)})" if v else ""))
            fitting = [e.predicted_throughput for _, _, e, v in grid if not v]
            if fitting:
                print(f"auto / best fitting grid policy: {choice.predicted_throughput / max(fitting):.2f}")
    return 0
