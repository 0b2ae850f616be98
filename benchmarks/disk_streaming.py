"""Weights streamed from a cold disk while the CPU computes: measured against max(read, compute) per pass.

With every weight on disk and the page cache cold, reads of layer j+1 should
overlap the compute of layer j, so that a pass over the model (the prefill, then each decode
step) takes about max(the disk's read time, the compute time) rather than their sum. All three
are measured here in one process on the same weights:

* **read**: every weight file of the offload folder read once, front to back in 16 MiB reads,
  after its pages were dropped from the page cache (``POSIX_FADV_DONTNEED``);
* **compute**: ``generate`` with every weight file in the page cache (read beforehand), so
  that reading costs only the memory copy;
* **streamed**: the same ``generate`` after the page cache was dropped.

The bound of the streamed run is (passes) x max(read, compute / passes); ``reached`` is the
bound over the streamed time. Rounds alternate the two ``generate`` kinds; medians are
printed. Defaults: a bfloat16 model (half the bytes on disk), computed as ``model.dtype:
auto`` decides for this CPU.

    python benchmarks/disk_streaming.py --model opt-1.3b --rounds 3

The offload folder is a fresh temporary one unless ``--offload-dir`` names one (on the disk
to measure; its converted weights are reused by later runs).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from flexgen import Policy, load_engine
from flexgen.models.opt import spec_for_size
from page_cache import drop_from_page_cache, read_all

def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "weights").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", help="a synthetic OPT size")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=3, help="passes over the model: this many")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--offload-dir", default=None)
    args = parser.parse_args()

    spec = spec_for_size(args.model)
    rng = random.Random(0)
    ids = [[rng.randrange(4, spec.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    with tempfile.TemporaryDirectory(prefix="flexgen-streaming-") as scratch:
        folder = Path(args.offload_dir or scratch)
        policy = Policy(gpu_batch_size=args.batch, weights_gpu=0, weights_cpu=0, pin_weights=False)
        with load_engine(args.model, policy=policy, device="cpu", dtype=args.dtype, offload_dir=folder) as engine:
            files = weight_files(folder)
            engine.generate(ids, max_new_tokens=2)  # warm-up: workspaces, buffers, thread choice
            times: dict[str, list[float]] = {"read": [], "compute": [], "streamed": []}
            for _ in range(args.rounds):
                drop_from_page_cache(files)
                start = time.perf_counter()
                size = read_all(files)
                times["read"].append(time.perf_counter() - start)
                read_all(files)  # now every page is cached
                start = time.perf_counter()
                engine.generate(ids, max_new_tokens=args.new_tokens)
                times["compute"].append(time.perf_counter() - start)
                drop_from_page_cache(files)
                start = time.perf_counter()
                engine.generate(ids, max_new_tokens=args.new_tokens)
                times["streamed"].append(time.perf_counter() - start)
            compute_dtype = str(engine.compute_dtype).removeprefix("torch.")
            threads = engine.stats.threads
    median = {k: statistics.median(v) for k, v in times.items()}
    passes = args.new_tokens
    bound = passes * max(median["read"], median["compute"] / passes)
    print(json.dumps({
        "model": args.model, "dtype_on_disk": args.dtype, "compute_dtype": compute_dtype, "batch": args.batch,
        "passes": passes, "weight_bytes": size, "threads": threads,
        "cold_read_GB_per_s": round(size / median["read"] / 1e9, 2),
        "median_s": {k: round(v, 2) for k, v in median.items()},
        "per_pass_s": {"read": round(median["read"], 2), "compute": round(median["compute"] / passes, 2),
                       "streamed": round(median["streamed"] / passes, 2)},
        "bound_s": round(bound, 2), "reached": f"{bound / median['streamed']:.0%}",
        "sum_s": round(passes * median["read"] + median["compute"], 2),
    }))


if __name__ == "__main__":
    main()
