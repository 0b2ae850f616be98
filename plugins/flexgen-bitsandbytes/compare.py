"""Error and bytes of the bitsandbytes compressors beside flexgen's built-in int4 / int8.

    python3 plugins/flexgen-bitsandbytes/compare.py [--no-engine] [--seed 0]

Part 1, tensors (float16, CPU): relative error ‖decompress(compress(x)) − x‖ / ‖x‖ and stored
bytes / float16 bytes for
  - a weight shaped like an OPT-1.3B fc1 slice, drawn N(0, 0.02) as OPT initialises;
  - a KV-cache slice (tokens, batch, heads, head size 64), N(0, 1);
  - the same with head size 80 (OPT-2.7B), where a 64-value block does not divide a row.
Part 2, the engine (float32, CPU): a tiny random OPT (saved by HF transformers) with each
compressor for weights, then for the cache; greedy-token agreement with the uncompressed run
and the stored / raw bytes the engine reports in ``engine.stats``.

Every compressor is built from its config name through flexgen's registry, exactly as a run
would build it; nothing here imports the plugin directly.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from flexgen import registry

NAMES = ["none", "int4", "bnb-nf4", "bnb-fp4", "int8", "bnb-int8"]
SPECS = {name: name for name in NAMES} | {"bnb-nf4 (blocksize 32)": {"name": "bnb-nf4", "blocksize": 32}}


def tensor_rows(seed: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "weight 2048x8192": torch.randn(2048, 8192, generator=gen) * 0.02,
        "cache D=64": torch.randn(64, 8, 12, 64, generator=gen),
        "cache D=80": torch.randn(64, 8, 32, 80, generator=gen),
    }
    rows = []
    for label, spec in SPECS.items():
        compressor = registry.create("compressor", spec)
        row = [label]
        for x in inputs.values():
            x = x.half()
            y = compressor.decompress(compressor.compress(x), tuple(x.shape), x.dtype)
            error = ((y.double() - x.double()).norm() / x.double().norm()).item()
            ratio = compressor.nbytes(tuple(x.shape), x.dtype) / (x.numel() * 2)
            row += [f"{error:.4f}", f"{ratio:.3f}"]
        rows.append(row)
    return rows


def engine_rows(seed: int) -> list[list[str]]:
    from transformers import OPTConfig, OPTForCausalLM

    from flexgen import Policy, load_engine

    prompts = [[2, *range(10 + 7 * i, 10 + 7 * i + 5 + i)] for i in range(8)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ckpt"
        torch.manual_seed(seed)
        model = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, ffn_dim=512,
                                         num_attention_heads=2, max_position_embeddings=128))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 1.0 if "embed" in name else 0.15)
        model.save_pretrained(path)
        policy = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=0, weights_cpu=100, cache_gpu=0, cache_cpu=100)

        def run(plugins: dict):
            with load_engine(path, policy=policy, plugins=plugins, device="cpu", dtype="float32",
                             offload_dir=Path(folder) / "offload") as engine:
                return engine.generate(prompts, max_new_tokens=24), engine.stats.to_dict()["compression"]

        base, _ = run({})
        rows = []
        for label, spec in SPECS.items():
            row = [label]
            for plugin_key, stats_key in (("weight_compressor", "weights"), ("cache_compressor", "cache")):
                out, stats = run({plugin_key: spec})
                pairs = [(a, b) for ra, rb in zip(out, base) for a, b in zip(ra, rb)]
                agreement = sum(a == b for a, b in pairs) / len(pairs)
                ratio = stats[f"{stats_key}_stored_bytes"] / stats[f"{stats_key}_raw_bytes"]
                row += [f"{agreement:.3f}", f"{ratio:.3f}"]
            rows.append(row)
        return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine", action="store_true", help="only the tensor table")
    args = parser.parse_args()
    print_table(
        "Tensors (float16, CPU): error = ‖y − x‖/‖x‖, bytes = stored / float16",
        ["compressor", "weight err", "weight bytes", "cache64 err", "cache64 bytes", "cache80 err", "cache80 bytes"],
        tensor_rows(args.seed),
    )
    if not args.no_engine:
        print_table(
            "Engine (tiny random OPT, float32, CPU): greedy-token agreement with uncompressed; "
            "stored / raw bytes from engine.stats (raw is float32)",
            ["compressor", "weights agree", "weights bytes", "cache agree", "cache bytes"],
            engine_rows(args.seed),
        )


if __name__ == "__main__":
    main()
