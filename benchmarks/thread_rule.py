"""The engine's own thread choice against every hand-picked setting, on an idle machine and beside a made load.

``threads: auto`` (flexgen/threads.py) should stay within 10 % of the best hand-picked thread
count, both with nothing else running and with another CPU-heavy process beside the engine.
This loads one engine with ``auto`` and one with each of 1 ... N threads (same synthetic
weights) and runs them in rounds, in a shuffled order each, so that drifts of the machine's
load fall on all of them alike: first as the machine is, then while ``--load`` background
processes each keep one core busy (a Python busy loop, which never sleeps, started before and
killed after the phase). For each phase it prints the median tokens/s of each setting, the
thread count ``auto`` chose, and ``auto`` / best.

    python benchmarks/thread_rule.py --model opt-125m --batch 32 --rounds 3 --load 1

"Idle" is the machine as it is when the script runs: on a shared machine other work may be
running too, and its load average is printed with each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from flexgen import Policy, load_engine
from flexgen.models.opt import spec_for_size
from flexgen.threads import usable_cores

BUSY_LOOP = "while True: pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-125m", help="a synthetic OPT size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", type=int, default=1, help="busy processes beside the engine in the second phase")
    args = parser.parse_args()

    spec = spec_for_size(args.model)
    rng = random.Random(0)
    ids = [[rng.randrange(4, spec.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    cores = usable_cores()
    settings: list[int | None] = [None, *range(1, cores + 1)]
    engines = {s: load_engine(args.model, policy=Policy(gpu_batch_size=args.batch, pin_weights=False), device="cpu",
                              dtype="float32", threads=s) for s in settings}
    tokens = args.batch * args.new_tokens
    results = {}
    for phase, load in (("idle", 0), (f"beside {args.load} busy process(es)", args.load)):
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0.0)  # let the load show in /proc/stat
            rates: dict[str, list[float]] = {label(s): [] for s in settings}
            chosen: list[int] = []
            for engine in engines.values():
                engine.generate(ids, max_new_tokens=2)  # warm-up
            order = random.Random(1)
            for _ in range(args.rounds):
                for setting in order.sample(settings, len(settings)):  # no setting always runs after another
                    engine = engines[setting]
                    start = time.perf_counter()
                    engine.generate(ids, max_new_tokens=args.new_tokens)
                    rates[label(setting)].append(tokens / (time.perf_counter() - start))
                    if setting is None and engine.stats.threads:
                        chosen.append(engine.stats.threads["threads"])
            medians = {k: statistics.median(v) for k, v in rates.items()}
            best = max(v for k, v in medians.items() if k != "auto")
            results[phase] = {
                "load_average_1m": round(os.getloadavg()[0], 2),
                "median_tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
                "auto_chose_threads": chosen,
                "auto_over_best": round(medians["auto"] / best, 2),
            }
            print(phase, json.dumps(results[phase]), flush=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()
    for engine in engines.values():
        engine.close()
    print(json.dumps({"model": args.model, "batch": args.batch, "cores": cores, **results}))


def label(setting: int | None) -> str:
    return "auto" if setting is None else f"{setting} thread{'s' if setting > 1 else ''}"


if __name__ == "__main__":
    main()
