"""How fast the engine places synthetic weights, beside a plain memory copy of the same bytes.

    python3 benchmarks/synthetic_placement.py [--model opt-6.7b] [--dtype float16] [--device cpu] [--repeat 2]

Benchmarks place tens of gigabytes of seeded synthetic weights before they measure anything
(OPT-30B is 60 GB in float16), so placement must run at memory speed, not at the speed of a
random generator. This command places ``--model`` with every weight in compute memory (the
``gpu`` tier; on a machine without CUDA that is the CPU's own memory) and times
``load_engine``; then, in the same run, it copies the same number of bytes into freshly
allocated tensors of the same shapes from one preallocated source (page faults included, as
placement has them), and prints both rates and their ratio. Nothing is asserted: the figures
are for reading.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgen import Policy, load_engine  # noqa: E402
from flexgen.engine import DTYPES, resolve_device  # noqa: E402
from flexgen.models import opt  # noqa: E402


def place(model: str, dtype: str, device: torch.device) -> float:
    """Seconds to place every weight of ``model`` in compute memory."""
    policy = Policy(gpu_batch_size=1, pin_weights=False)
    started = time.perf_counter()
    engine = load_engine(model, policy=policy, device=device, dtype=dtype)
    _sync(device)
    seconds = time.perf_counter() - started
    engine.close()
    del engine
    gc.collect()
    return seconds


def copy_same_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> float:
    """Seconds to copy into fresh tensors of ``shapes`` from one source of the largest size."""
    source = torch.empty(max(opt._numel(s) for s in shapes), dtype=dtype, device=device).normal_()
    _sync(device)
    kept = []
    started = time.perf_counter()
    for shape in shapes:
        out = torch.empty(shape, dtype=dtype, device=device)
        out.view(-1).copy_(source[: out.numel()])
        kept.append(out)
    _sync(device)
    seconds = time.perf_counter() - started
    del kept, source
    gc.collect()
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opt-6.7b", help="synthetic OPT size (default opt-6.7b)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="compute device: cpu, cuda or auto (default cpu)")
    parser.add_argument("--repeat", type=int, default=2, help="alternate the two measurements this many times; best of each")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    spec = opt.spec_for_size(args.model)
    shapes = [w.shape for i in range(spec.num_model_layers) for w in opt.layer_weights(spec, i)]
    nbytes = sum(opt._numel(s) for s in shapes) * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    best_place = best_copy = float("inf")
    for _ in range(args.repeat):
        best_place = min(best_place, place(args.model, args.dtype, device))
        best_copy = min(best_copy, copy_same_bytes(shapes, DTYPES[args.dtype], device))
    print(f"synthetic placement: {args.model}, {args.dtype}, {nbytes / 1e9:.2f} GB, all weights in compute memory "
          f"on {device}, {torch.get_num_threads()} intra-op threads, best of {args.repeat}")
    print(f"  {'placement (load_engine)':<34}{best_place:8.2f} s{nbytes / best_place / 1e9:9.2f} GB/s")
    print(f"  {'plain copy into fresh tensors':<34}{best_copy:8.2f} s{nbytes / best_copy / 1e9:9.2f} GB/s")
    print(f"  placement rate / copy rate: {best_copy / best_place:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
