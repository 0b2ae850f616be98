"""Anonymous memory the engine adds when every weight lives on disk.

Runs a synthetic OPT in float16 with weights 100 % on disk (conversion included, in a fresh
offload folder unless --offload-dir is given), samples the process's RssAnon from
/proc/self/status every few milliseconds, and prints the peak above what the imports alone
take, beside the model's weight bytes. File-backed pages (the memory-mapped weights in the
page cache) are not anonymous memory and do not count.

    python benchmarks/disk_memory.py --model opt-1.3b
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """Samples RssAnon until stopped; keeps the peak."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, rss_anon_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_anon_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--offload-dir", default=None)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    import torch

    from flexgen import Policy, load_engine
    from flexgen.models.opt import spec_for_size, weight_bytes

    torch.set_num_threads(2)
    baseline = rss_anon_bytes()
    sampler = PeakSampler()
    sampler.start()
    offload = args.offload_dir or tempfile.mkdtemp(prefix="flexgen-disk-memory-")
    policy = Policy(gpu_batch_size=args.batch, weights_gpu=0, weights_cpu=0)
    started = time.perf_counter()
    with load_engine(args.model, policy=policy, device="cpu", dtype="float16", offload_dir=offload) as engine:
        placed = time.perf_counter()
        prompts = [[2] + [100 + i] * (args.prompt_len - 1) for i in range(args.batch)]
        engine.generate(prompts, max_new_tokens=args.new_tokens)
    done = time.perf_counter()
    peak = sampler.stop()
    weights = weight_bytes(spec_for_size(args.model), torch.float16)
    added = peak - baseline
    print(json.dumps({
        "model": args.model,
        "weight_bytes": weights,
        "baseline_rss_anon": baseline,
        "peak_rss_anon_added": added,
        "ratio": round(added / weights, 4),
        "place_s": round(placed - started, 1),
        "generate_s": round(done - placed, 1),
    }))


if __name__ == "__main__":
    main()
