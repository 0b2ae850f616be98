"""Loading an HF checkpoint into the engine, against reading and copying the same bytes.

Loading and conversion should run at the speed of the disk and memory, not of
Python. This writes a random OPT checkpoint of a published size with transformers'
``save_pretrained`` (float32 safetensors; once, into ``--checkpoint`` if it is empty), then
measures in one process, alternating in rounds:

* **read**: every file of the checkpoint read once into memory (page cache warm: the engine's
  loads after the first find it warm too);
* **read + copy**: the same, each tensor then copied into fresh memory (``torch.empty`` +
  ``copy_``), which is what any loader that keeps the weights in process memory must do;
* **engine (memory)**: ``load_engine`` with every weight in compute memory, float32;
* **engine (disk)**: ``load_engine`` with every weight on disk, into a fresh offload folder
  each round (the conversion writes the weights again), against a plain write of the same
  bytes measured in the same round.

    python benchmarks/load_speed.py --model opt-1.3b --checkpoint /tmp/opt-1.3b-hf --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from flexgen import Policy, load_engine
from flexgen.models.opt import spec_for_size
from page_cache import READ_CHUNK, read_all


def write_checkpoint(path: Path, model: str) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    spec = spec_for_size(model)
    config = OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                       ffn_dim=spec.ffn_dim, num_attention_heads=spec.num_heads,
                       max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.word_embed_proj_dim,
                       do_layer_norm_before=spec.do_layer_norm_before, torch_dtype="float32")
    with torch.device("meta"):
        hf = OPTForCausalLM(config)
    hf = hf.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(torch.rand(param.shape, generator=generator).sub_(0.5).mul_(0.04))
    hf.save_pretrained(path)


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def read_and_copy(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                torch.empty_like(tensor).copy_(tensor)
                total += tensor.numel() * tensor.element_size()
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", help="a published OPT size")
    parser.add_argument("--checkpoint", required=True, help="folder of the checkpoint (written if empty)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", default=None, help="where the offload folders go (default: a temporary folder)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir() or not files(checkpoint):
        checkpoint.mkdir(parents=True, exist_ok=True)
        print(f"writing a random {args.model} checkpoint to {checkpoint} ...", flush=True)
        write_checkpoint(checkpoint, args.model)
    paths = files(checkpoint)
    size = read_all(paths)  # warm the page cache
    times: dict[str, list[float]] = {k: [] for k in ("read", "read + copy", "engine (memory)", "write", "engine (disk)")}
    with tempfile.TemporaryDirectory(prefix="flexgen-load-", dir=args.scratch) as scratch:
        for round_ in range(args.rounds):
            times["read"].append(timed(lambda: read_all(paths)))
            times["read + copy"].append(timed(lambda: read_and_copy(paths)))

            def in_memory():
                load_engine(checkpoint, policy=Policy(gpu_batch_size=1, pin_weights=False), device="cpu",
                            dtype="float32").close()

            times["engine (memory)"].append(timed(in_memory))
            plain = Path(scratch) / "plain"

            def write():
                with open(plain, "wb") as out:
                    for path in paths:
                        with open(path, "rb") as f:
                            shutil.copyfileobj(f, out, READ_CHUNK)
                    out.flush()

            times["write"].append(timed(write))
            plain.unlink()
            folder = Path(scratch) / f"offload-{round_}"

            def on_disk():
                policy = Policy(gpu_batch_size=1, weights_gpu=0, weights_cpu=0, pin_weights=False)
                load_engine(checkpoint, policy=policy, device="cpu", dtype="float32", offload_dir=folder).close()

            times["engine (disk)"].append(timed(on_disk))
            shutil.rmtree(folder)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "model": args.model, "checkpoint_GB": round(size / 1e9, 2),
        "median_s": {k: round(v, 2) for k, v in median.items()},
        "GB_per_s": {k: round(size / v / 1e9, 2) for k, v in median.items()},
        "engine_memory_over_read_copy": round(median["engine (memory)"] / median["read + copy"], 2),
        "engine_disk_over_write": round(median["engine (disk)"] / median["write"], 2),
    }))


if __name__ == "__main__":
    main()
