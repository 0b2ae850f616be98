"""What verifying converted weights costs, beside converting them and beside reading them.

Every converted disk-tier file carries a CRC-32 of its data, checked when a process first maps
the file (``DiskStorage.get``). This converts a synthetic OPT's weights into a fresh offload
folder through the disk tier (as the engine does, with the checksum written), then, side by
side in one run and on the same files, times:

* ``verify``: what a later process pays, ``DiskStorage.get`` of every tensor (header check,
  map, CRC-32 of the bytes);
* ``read``: mapping the same files and copying every tensor out once without a checksum (what
  moving the weights to compute costs at least, every time they are used);

each twice, once warm (the files in the page cache, as right after conversion) and once cold
(dropped from the page cache with ``posix_fadvise(DONTNEED)`` first, as after a reboot), and
prints the ratios verify / convert and verify / read. It prints figures; it asserts nothing.

    python benchmarks/checksum_cost.py --model opt-125m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from page_cache import drop_from_page_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-125m", help="synthetic OPT size")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--offload-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()

    import torch

    from flexgen.engine import DTYPES
    from flexgen.models.checkpoint import SyntheticWeights
    from flexgen.models.opt import layer_weights, spec_for_size
    from flexgen.storage.disk import DiskStorage, map_safetensors

    torch.set_num_threads(1)
    spec = spec_for_size(args.model)
    dtype = DTYPES[args.dtype]
    source = SyntheticWeights(spec, dtype=dtype)
    weights = [w for i in range(spec.num_model_layers) for w in layer_weights(spec, i)]
    with tempfile.TemporaryDirectory(dir=args.offload_dir) as tmp:
        folder = Path(tmp)
        tensors = {w.name: source.get(w) for w in weights}  # drawn first: not part of the conversion
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

        storage = DiskStorage(offload_dir=folder)
        start = time.perf_counter()
        for name, tensor in tensors.items():
            storage.put(f"weights/{name}", tensor)
        convert = time.perf_counter() - start
        storage.close()
        del tensors

        def verify() -> float:
            fresh = DiskStorage(offload_dir=folder)
            start = time.perf_counter()
            for w in weights:
                assert fresh.get(f"weights/{w.name}") is not None
            took = time.perf_counter() - start
            fresh.close()
            return took

        def read() -> float:
            start = time.perf_counter()
            for w in weights:
                data = map_safetensors(folder / f"weights/{w.name}.safetensors")["data"]
                data.clone()  # one copy out of the page cache, as moving a weight to compute does
            return time.perf_counter() - start

        figures = {}
        for state in ("warm", "cold"):
            for name, fn in (("verify", verify), ("read", read)):
                if state == "cold":
                    drop_from_page_cache(folder.rglob("*.safetensors"))
                figures[(state, name)] = fn()

    gb = nbytes / 1e9
    print(f"{args.model} {args.dtype}: {len(weights)} tensors, {gb:.2f} GB; conversion {convert:.2f} s "
          f"({gb / convert:.2f} GB/s)")
    for state in ("warm", "cold"):
        v, r = figures[(state, "verify")], figures[(state, "read")]
        print(f"  {state}: verify {v:.2f} s ({gb / v:.2f} GB/s), read {r:.2f} s ({gb / r:.2f} GB/s); "
              f"verify / convert = {v / convert:.2f}, verify / read = {v / r:.2f}")


if __name__ == "__main__":
    main()
