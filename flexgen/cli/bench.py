"""``flexgen bench --config FILE [key=value ...]``: measure a workload beside its bound, or draw results.

The measurement is :func:`flexgen.bench.run_bench`; this is the command around it: its
options, checked before anything slow; the JSON written as figures arrive (so a run stopped
by a time limit keeps its bound), the report, and ``--plot``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flexgen.bench.measure import BASELINES, DISK_CACHE_MODES, BenchReport, format_report, run_bench
from flexgen.cli.args import ArgParser
from flexgen.config import load_config
from flexgen.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(
        prog="flexgen bench",
        description="Measure generation throughput on synthetic weights and prompts, beside the cost "
        "model's bound for the same policy on this machine.",
        epilog="examples: flexgen bench --config configs/bench/w1-opt-6.7b-gpu.yaml --baseline hf --plot w1.png; "
        "flexgen bench --plot all.png W1.json W2.json (earlier --json results, side by side)",
    )
    parser.add_argument("--config", default=None,
                        help="YAML config (configs/bench/*.yaml); required unless --plot draws earlier --json results")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.num_prompts=8; with --plot and no --config: bench JSON files")
    parser.add_argument("--baseline", choices=BASELINES, default=None,
                        help="also run HF transformers' generate on the same weights and prompts, and print the ratio")
    parser.add_argument("--baseline-batch-size", type=int, default=None,
                        help="sequences per HF generate call (default: policy.gpu_batch_size)")
    parser.add_argument("--baseline-prompts", type=int, default=None,
                        help="run the baseline on the first N prompts only (its throughput is per batch anyway; "
                        "a slow baseline then fits the time one has)")
    parser.add_argument("--hardware", default=None,
                        help="hardware profile for the bound: a preset (h200, t4-paper) or a YAML file; "
                        "default: this machine, measured once and cached")
    parser.add_argument("--refresh-hardware", action="store_true", help="measure this machine again")
    parser.add_argument("--disk-cache", choices=DISK_CACHE_MODES, default="auto",
                        help="disk-tier reads in the bound: from the page cache (warm) or the device (cold)")
    parser.add_argument("--bound-only", action="store_true", help="print the bound and exit without running")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up generate")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure this many times (engine and baseline alike) and keep the fastest; "
                        "steadier figures on a shared machine")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw the result (throughput measured beside the bound per phase, bytes moved per "
                        "link measured beside modelled) into this .png/.svg/.pdf; needs matplotlib "
                        "(pip install 'flexgen[plot]')")
    return parser


def bench_command(argv: list[str]) -> int:
    """Entry point of ``flexgen bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        from flexgen.bench.plot import check_plot_path, plot_reports, read_report

        check_plot_path(Path(args.plot))
        if args.config is None:  # draw earlier results: the positional arguments are their JSON files
            if not args.overrides:
                raise ConfigError("--plot without --config draws bench JSON files: flexgen bench --plot out.png a.json ...")
            files = [Path(name) for name in args.overrides]
            plot_reports([read_report(f) for f in files], Path(args.plot), names=[f.name for f in files])
            print(f"flexgen bench: drew {len(files)} result(s) into {args.plot}")
            return 0
    if args.config is None:
        raise ConfigError("--config is required (or --plot FILE.png with bench JSON files to draw)")
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
    for key in ("baseline_batch_size", "baseline_prompts"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if args.json is not None:
        _check_writable(Path(args.json))
    cfg = load_config(args.config, args.overrides)

    def save(report: BenchReport) -> None:
        """The JSON as far as it goes: written once the bound is known and again with each figure,
        so a run stopped by a time limit still leaves its bound behind."""
        if args.json is not None:
            from flexgen.atomic import write_json_atomic

            write_json_atomic(Path(args.json), report.to_dict(), key="--json")

    report = run_bench(
        cfg,
        baseline=args.baseline,
        baseline_batch_size=args.baseline_batch_size,
        baseline_prompts=args.baseline_prompts,
        hardware=args.hardware,
        refresh_hardware=args.refresh_hardware,
        disk_cache=args.disk_cache,
        bound_only=args.bound_only,
        warmup=not args.no_warmup,
        repeat=args.repeat,
        progress=lambda line: print(line, flush=True),
        on_figures=save,
    )
    save(report)
    print(format_report(report))
    if args.plot is not None:
        from flexgen.bench.plot import plot_reports

        plot_reports([report.to_dict()], Path(args.plot))
        print(f"  plot: {args.plot}")
    return 0


def _check_writable(path: Path) -> None:
    """``--json PATH``: a file (new, or one to replace) in an existing folder, checked before the bench runs."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"--json: folder {folder} does not exist")
    if path.is_dir():
        raise ConfigError(f"--json: {path} is a folder; give a file name, e.g. {path / 'bench.json'}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"--json: {path} is not a regular file")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--json: cannot write {path}")
