"""The engine against HF transformers' generate on the CPU, weights in memory or on disk, runs alternated in one process.

``flexgen bench --baseline hf --repeat N`` measures N engine runs, then N HF runs; on a machine
shared with other jobs the load drifts between the two halves and the ratio with it. Here both
models are loaded once, on the same synthetic weights and prompts, and each round runs the
engine then HF back to back with the same intra-op threads, so both see the same load; the
figure is the ratio of the medians over the rounds (and each round's own ratio). Each side's
prefill is timed once too (a generate of one new token), and the JSON line splits the median
run into prefill and decode steps.

    python benchmarks/cpu_paired.py --model opt-125m --dtype float32 --batch 32 --rounds 3

With ``--weights-on-disk DIR`` both sides keep every weight on disk under DIR: the engine
reads each layer from its offload folder while it computes the one before, HF runs with
Accelerate's disk offload (``dispatch_model``, a ``device_map`` of "disk" for every module,
as ``flexgen bench --baseline hf`` places it), both on the CPU; the page cache is warm after
the warm-up, as in ``configs/bench/cpu-disk-opt-1.3b.yaml``:

    python benchmarks/cpu_paired.py --model opt-1.3b --prompt-len 16 --new-tokens 16 --rounds 3 --weights-on-disk DIR

Outputs are checked equal for greedy decoding (printed as ``identical``). With ``--dtype
bfloat16`` on a CPU without native bfloat16 the engine computes in float32 (README, "Data
types on the CPU") while HF computes in bfloat16 as asked; their tokens then differ, which
is why ``identical`` is printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from flexgen import Policy, load_engine
from flexgen.bench.measure import hf_model, hf_placed_model
from flexgen.models.opt import spec_for_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-125m", help="a synthetic OPT size")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=32, help="prompts, all in one batch on both sides")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: what the engine decides (auto)")
    parser.add_argument("--weights-on-disk", metavar="DIR", default=None,
                        help="every weight on disk under DIR on both sides (HF: Accelerate's disk offload)")
    args = parser.parse_args()

    spec = spec_for_size(args.model)
    rng = random.Random(0)
    ids = [[rng.randrange(4, spec.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    if args.weights_on_disk:
        policy = Policy(gpu_batch_size=args.batch, weights_gpu=0, weights_cpu=0, pin_weights=False)
        engine = load_engine(args.model, policy=policy, device="cpu", offload_dir=args.weights_on_disk,
                             dtype=args.dtype, threads=args.threads)
        hf, placement = hf_placed_model(args.model, spec, args.dtype, 0, policy, "cpu", args.weights_on_disk)
        print(f"weights on disk under {args.weights_on_disk}; hf: {placement}", flush=True)
    else:
        engine = load_engine(args.model, policy=Policy(gpu_batch_size=args.batch, pin_weights=False), device="cpu",
                             dtype=args.dtype, threads=args.threads)
        hf = hf_model(args.model, spec, args.dtype, seed=0)
    x = torch.tensor(ids)

    def run_engine(n: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = engine.generate(ids, max_new_tokens=n)
        return time.perf_counter() - start, out

    def run_hf(n: int) -> tuple[float, list[list[int]]]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=spec.pad_token_id)
            return time.perf_counter() - start, out[:, args.prompt_len:].tolist()

    run_engine(2)  # warm-up; it also settles the engine's thread choice, which HF then uses
    threads = engine.stats.threads["threads"] if engine.stats.threads else torch.get_num_threads()
    torch.set_num_threads(threads)
    run_hf(2)
    # The prefill alone (a generate of one new token), once per side: what of each side's time
    # the decode steps leave.
    prefill = {"flexgen": run_engine(1)[0]}
    torch.set_num_threads(threads)
    prefill["hf"] = run_hf(1)[0]
    print(f"prefill (a generate of 1 new token): flexgen {prefill['flexgen']:.2f} s, hf {prefill['hf']:.2f} s",
          flush=True)
    tokens = args.batch * args.new_tokens
    rates: dict[str, list[float]] = {"flexgen": [], "hf": []}
    identical = 0
    for round_ in range(args.rounds):
        seconds, ours = run_engine(args.new_tokens)
        rates["flexgen"].append(tokens / seconds)
        torch.set_num_threads(threads)  # the engine restores the caller's setting after each generate
        seconds, theirs = run_hf(args.new_tokens)
        rates["hf"].append(tokens / seconds)
        identical = sum(a == b for a, b in zip(ours, theirs))
        print(f"round {round_ + 1}: flexgen {rates['flexgen'][-1]:.1f}, hf {rates['hf'][-1]:.1f} tokens/s, "
              f"ratio {rates['flexgen'][-1] / rates['hf'][-1]:.2f}", flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    steps = max(1, args.new_tokens - 1)
    decode_step = {k: (tokens / medians[k] - prefill[k]) / steps for k in medians}
    print(json.dumps({
        "model": args.model, "dtype": args.dtype, "engine_compute_dtype": str(engine.compute_dtype).removeprefix("torch."),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": threads,
        "weights": "disk" if args.weights_on_disk else "memory",
        "median_tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
        "ratio_of_medians": round(medians["flexgen"] / medians["hf"], 2),
        "prefill_s": {k: round(v, 2) for k, v in prefill.items()},
        "decode_step_s": {k: round(v, 3) for k, v in decode_step.items()},
        "identical_outputs": f"{identical}/{args.batch}",
    }))
    engine.close()


if __name__ == "__main__":
    main()
