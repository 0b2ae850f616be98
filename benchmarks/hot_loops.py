"""The hot loops, old code path beside new, and a copy of the same bytes as the yardstick.

Prints, for this machine and in one run (candidates measured in interleaved rounds, best of
``--repeat``, so that load from other processes hits them alike):

1. CPU decode attention at W3's per-batch shape (B=32, H=40, t=512, D=128) over a float16 and a
   bfloat16 cache laid out as the engine keeps it, (T, B, H, D), and passed as (B, H, t, D)
   views: seconds per call and gigabytes of cache read per second, for the old path (whole
   prefix converted to float32 copies), the blocked one (reused workspace; what ``CPUAttention``
   runs where the native kernel is not built) and ``CPUAttention`` itself (the native decode
   kernel, ``flexgen/kernels/decode_attention.c``, where built), beside a copy of the same
   bytes into a preallocated buffer;
2. the same over an int4 and an int8 cache: the old path (the whole prefix decompressed, then
   attended) and the new one (``PackedKV``, dequantised block by block inside the attention);
   "GB/s" counts the compressed bytes read;
3. int4 and int8 weight decompression (a 5120 × 5120 float16 weight, OPT-13B's projection) in
   gigabytes of output per second: the old whole-tensor torch sequence, the new path
   allocating its output, and the new path into a reused buffer, beside a plain float16 copy
   of the output's size;
4. the cache layout: decode attention over a (T, B, H, D) cache against a (B, H, T, D) one,
   and the cost of appending one token per step to each;
5. a decode product with a bfloat16 weight computed in float32 (OPT-1.3B's 8192 x 2048 and
   2048 x 8192, opt-125m's 3072 x 768; 4 and 32 rows): the weight unpacked by blocks of rows
   into float32 (the old path) against the few-row kernel reading it as it is held; "GB/s"
   counts the bfloat16 weight's bytes. Weights cycle through 300 MB, more than the caches;
6. a float32 decode product (``--batch`` rows, 32 by default) over OPT's matrices (opt-125m's
   and OPT-1.3B's, and opt-125m's output embedding), weights cycling through 300 MB: MKL
   (``F.linear``), oneDNN and the few-row kernel (``flexgen/kernels/few_rows.c``), in GFLOP/s.

    python3 benchmarks/hot_loops.py                  # the full figures (a few minutes on 2 cores)
    python3 benchmarks/hot_loops.py --quick          # small shapes, seconds
    python3 benchmarks/hot_loops.py --only attention --threads 1 --repeat 9
    python3 benchmarks/hot_loops.py --only products  # float32 decode products (section 6)

The old paths live here only, as reference functions, so the gain stays visible after the
library moved on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from flexgen.attention.base import PackedKV
from flexgen.attention.blocked import blocked_decode
from flexgen.attention.cpu import CPUAttention
from flexgen.compression.groupwise import GroupwiseQuantizer, Int4Compressor, Int8Compressor
from flexgen.kernels import decode_attention
from flexgen.kernels import few_rows
from flexgen.linear import few_rows_enabled, few_rows_off_reason, linear, onednn_enabled
from flexgen.testing.models import TensorRows
from flexgen.workspace import Workspace

# ----------------------------------------------------------------------------- old code paths


def old_cpu_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``CPUAttention.decode`` before issue 12: float32 copies of the whole prefix, every call."""
    dtype = torch.float32
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))
    scores.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(dtype)
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)


def old_groupwise_decompress(
    quantizer: GroupwiseQuantizer, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``GroupwiseQuantizer.decompress`` before issue 12 (grouped axis last): whole-tensor float32 passes."""
    g = quantizer.group_size
    length = shape[-1]
    groups = -(-length // g)
    data = parts["data"]
    lead = data.shape[:-1]
    scale = parts["scale"].float().unsqueeze(-1)
    lo = parts["min"].float().unsqueeze(-1)
    pad = groups * g - length
    if quantizer.bits == 4 and g % 2 == 0:
        half = g // 2
        byte_pad = groups * half - data.shape[-1]
        if byte_pad:
            data = F.pad(data, (0, byte_pad))
        data = data.reshape(*lead, groups, half)
        out = torch.empty(*lead, groups, half, 2, dtype=torch.float32)
        out[..., 0] = (data & 0x0F).float().mul_(scale).add_(lo)
        out[..., 1] = (data >> 4).float().mul_(scale).add_(lo)
        out = out.reshape(*lead, groups * g)
    else:
        if quantizer.bits == 4:
            codes = torch.stack([data & 0x0F, data >> 4], dim=-1).reshape(*lead, -1)[..., :length]
        else:
            codes = data
        if pad:
            codes = F.pad(codes, (0, pad))
        codes = codes.reshape(*lead, groups, g).float()
        out = torch.addcmul(lo, codes, scale).reshape(*lead, groups * g)
    if pad:
        out = out[..., :length]
    return out.to(dtype).contiguous()


def old_packed_decode(q, k: PackedKV, v: PackedKV, valid) -> torch.Tensor:
    """The engine before issue 12 with a compressed cache: decompress the whole prefix, then attend."""
    keys = old_groupwise_decompress(k.compressor, k.parts, k.shape, k.dtype).permute(1, 2, 0, 3)
    values = old_groupwise_decompress(v.compressor, v.parts, v.shape, v.dtype).permute(1, 2, 0, 3)
    return old_cpu_decode(q, keys, values, valid)


# ----------------------------------------------------------------------------- measuring


def measure(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best seconds per call of each candidate, over ``repeat`` interleaved rounds (after a warm-up)."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report(title: str, seconds: dict[str, float], nbytes: dict[str, int], reference: str, unit: str) -> None:
    print(f"\n{title}")
    print(f"  {'path':34s} {'s/call':>10s} {unit:>12s} {'vs ' + reference:>14s}")
    ref_rate = nbytes[reference] / seconds[reference]
    for name, s in seconds.items():
        rate = nbytes[name] / s
        print(f"  {name:34s} {s:10.5f} {rate / 1e9:12.2f} {100 * rate / ref_rate:13.1f}%")


def kv_cache(t: int, b: int, h: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t, b, h, d, generator=gen).to(dtype)


def bench_attention(args, gen: torch.Generator) -> None:
    b, h, t, d = args.batch, args.heads, args.tokens, args.head_dim
    q = torch.randn(b, h, 1, d, generator=gen) / d**0.5
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, : t // 4] = False  # one left-padded sequence, as in a real batch
    new = CPUAttention()
    workspace = Workspace()
    kernel = "native kernel" if decode_attention.available() else "kernel not built: blocked"

    def blocked(k, v) -> torch.Tensor:
        return blocked_decode(q, k, v, valid, compute_dtype=torch.float32, block_bytes=new.block_bytes,
                              workspace=workspace)

    for dtype in (torch.float16, torch.bfloat16):
        kc, vc = kv_cache(t, b, h, d, dtype, gen), kv_cache(t, b, h, d, dtype, gen)
        k, v = kc.permute(1, 2, 0, 3), vc.permute(1, 2, 0, 3)
        kd, vd = torch.empty_like(kc), torch.empty_like(vc)
        expected = old_cpu_decode(q, k, v, valid)
        errors = [(fn() - expected).abs().max().item() for fn in (lambda: blocked(k, v), lambda: new.decode(q, k, v, valid))]
        nbytes = 2 * kc.numel() * kc.element_size()
        seconds = measure({
            "copy into preallocated buffer": lambda: (kd.copy_(kc), vd.copy_(vc)),
            "old: float32 copies of the prefix": lambda: old_cpu_decode(q, k, v, valid),
            "blocked, reused workspace": lambda: blocked(k, v),
            f"CPUAttention ({kernel})": lambda: new.decode(q, k, v, valid),
        }, args.repeat)
        report(
            f"CPU decode attention, {str(dtype).removeprefix('torch.')} cache (T,B,H,D) = ({t},{b},{h},{d}), "
            f"{nbytes / 1e6:.0f} MB of K+V per call; max |diff| from old: blocked {errors[0]:.2e}, "
            f"CPUAttention {errors[1]:.2e}",
            seconds, dict.fromkeys(seconds, nbytes), "copy into preallocated buffer", "GB/s read",
        )


def bench_packed_attention(args, gen: torch.Generator) -> None:
    b, h, t, d = args.batch, args.heads, args.tokens, args.head_dim
    q = torch.randn(b, h, 1, d, generator=gen) / d**0.5
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, : t // 4] = False
    new = CPUAttention()
    dtype = torch.float16
    for compressor in (Int4Compressor(), Int8Compressor()):
        packed = []
        for _ in range(2):
            parts = compressor.compress(kv_cache(t, b, h, d, dtype, gen))
            packed.append(PackedKV(parts, compressor, (t, b, h, d), dtype))
        k, v = packed
        copies = [{n: torch.empty_like(p) for n, p in kv.parts.items()} for kv in packed]

        def copy() -> None:
            for kv, dst in zip(packed, copies):
                for name, part in kv.parts.items():
                    dst[name].copy_(part)

        expected = old_packed_decode(q, k, v, valid)
        error = (new.decode(q, k, v, valid) - expected).abs().max().item()
        nbytes = sum(p.numel() * p.element_size() for kv in packed for p in kv.parts.values())
        seconds = measure({
            "copy into preallocated buffer": copy,
            "old: decompress prefix, attend": lambda: old_packed_decode(q, k, v, valid),
            "new: PackedKV, blocked dequantise": lambda: new.decode(q, k, v, valid),
        }, args.repeat)
        name = type(compressor).__name__.removesuffix("Compressor").lower()
        report(
            f"CPU decode attention, {name} cache of float16 (T,B,H,D) = ({t},{b},{h},{d}), "
            f"{nbytes / 1e6:.0f} MB compressed K+V per call; new - old max |diff| = {error:.2e}",
            seconds, dict.fromkeys(seconds, nbytes), "copy into preallocated buffer", "GB/s read",
        )


def bench_weights(args, gen: torch.Generator) -> None:
    rows, cols = args.weight_rows, args.weight_cols
    dtype = torch.float16
    weight = torch.randn(rows, cols, generator=gen).to(dtype)
    plain = torch.empty_like(weight)
    out = torch.empty_like(weight)
    for compressor in (Int4Compressor(), Int8Compressor()):
        parts = compressor.compress(weight)
        shape = (rows, cols)
        expected = old_groupwise_decompress(compressor, parts, shape, dtype)
        assert torch.equal(compressor.decompress(parts, shape, dtype), expected), "new decompression differs from old"
        nbytes = weight.numel() * weight.element_size()
        seconds = measure({
            "plain float16 copy": lambda: plain.copy_(weight),
            "old: whole-tensor float32 passes": lambda: old_groupwise_decompress(compressor, parts, shape, dtype),
            "new: decompress (fresh output)": lambda: compressor.decompress(parts, shape, dtype),
            "new: decompress_into reused buffer": lambda: compressor.decompress_into(parts, out, dtype),
        }, args.repeat)
        name = type(compressor).__name__.removesuffix("Compressor").lower()
        report(
            f"{name} weight decompression to float16, {rows} x {cols} ({nbytes / 1e6:.0f} MB of output); new == old bitwise",
            seconds, dict.fromkeys(seconds, nbytes), "plain float16 copy", "GB/s out",
        )


def bench_layouts(args, gen: torch.Generator) -> None:
    b, h, t, d = args.batch, args.heads, args.tokens, args.head_dim
    dtype = torch.float16
    q = torch.randn(b, h, 1, d, generator=gen) / d**0.5
    attention = CPUAttention()
    tbhd = [kv_cache(t + 1, b, h, d, dtype, gen) for _ in range(2)]          # the engine's layout
    bhtd = [x.permute(1, 2, 0, 3).contiguous() for x in tbhd]                 # head-major alternative
    new_token = torch.randn(b, h, 1, d, generator=gen).to(dtype)
    nbytes = 2 * b * h * t * d * 2
    seconds = measure({
        "attend (T,B,H,D) as (B,H,t,D) view": lambda: attention.decode(
            q, tbhd[0][:t].permute(1, 2, 0, 3), tbhd[1][:t].permute(1, 2, 0, 3), None),
        "attend (B,H,T,D) prefix view": lambda: attention.decode(q, bhtd[0][:, :, :t], bhtd[1][:, :, :t], None),
    }, args.repeat)
    report(f"Cache layout: decode attention, float16, B={b} H={h} t={t} D={d}",
           seconds, dict.fromkeys(seconds, nbytes), "attend (T,B,H,D) as (B,H,t,D) view", "GB/s read")
    row_bytes = 2 * b * h * d * 2
    appends = measure({
        "append to (T,B,H,D): one contiguous row": lambda: [x[t].copy_(new_token[:, :, 0]) for x in tbhd],
        "append to (B,H,T,D): B*H rows of D": lambda: [x[:, :, t].copy_(new_token[:, :, 0]) for x in bhtd],
    }, args.repeat * 20)
    report("Cache layout: appending one token's K and V", appends, dict.fromkeys(appends, row_bytes),
           "append to (T,B,H,D): one contiguous row", "GB/s written")


class _Held(TensorRows):
    """A bfloat16 weight handed to ``linear`` as the engine hands a converted one: held as it
    is. ``TensorRows`` itself (``held`` None) is the path before, unpacked by blocks of rows."""

    def held(self) -> torch.Tensor:
        return self.tensor


def bench_held(args, gen: torch.Generator) -> None:
    if not few_rows_enabled():
        print(f"\nHalf-precision weights read as held: skipped, the few-row kernel is off ({few_rows_off_reason()})")
        return
    for rows in (4, 32):
        for out_features, in_features in ((8192, 2048), (2048, 8192), (3072, 768)):
            count = max(4, int(300e6 // (out_features * in_features * 2)))
            weights = [torch.randn(out_features, in_features, generator=gen).bfloat16() for _ in range(count)]
            x = torch.randn(rows, in_features, generator=gen)
            unpacked, held = [TensorRows(w) for w in weights], [_Held(w) for w in weights]
            assert torch.equal(linear(x, unpacked[0]), linear(x, held[0])), "held differs from unpacked"
            seconds = measure({
                "old: unpacked by blocks of rows": lambda: [linear(x, w) for w in unpacked],
                "new: read as held (few-row kernel)": lambda: [linear(x, w) for w in held],
            }, args.repeat)
            seconds = {name: s / count for name, s in seconds.items()}
            nbytes = out_features * in_features * 2
            report(f"bfloat16 weight {out_features} x {in_features} computed in float32, {rows} rows; new == old bitwise",
                   seconds, dict.fromkeys(seconds, nbytes), "old: unpacked by blocks of rows", "GB/s read")


#: (out, in) of the float32 decode products: opt-125m's four matrices and output embedding, OPT-1.3B's three.
PRODUCT_SHAPES = ((768, 768), (3072, 768), (768, 3072), (50272, 768), (2048, 2048), (8192, 2048), (2048, 8192))


def bench_products(args, gen: torch.Generator) -> None:
    rows = args.batch
    shapes = PRODUCT_SHAPES[:1] if args.quick else PRODUCT_SHAPES
    for out_features, in_features in shapes:
        count = max(2, int(300e6 // (out_features * in_features * 4)))
        weights = [torch.randn(out_features, in_features, generator=gen) for _ in range(count)]
        x = torch.randn(rows, in_features, generator=gen)
        candidates = {"MKL (F.linear)": lambda: [F.linear(x, w) for w in weights]}
        if onednn_enabled():
            candidates["oneDNN"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                            for w in weights]
        if few_rows.available():
            candidates["few-row kernel"] = lambda: [few_rows.few_rows_linear(x, w, None) for w in weights]
        seconds = {name: s / count for name, s in measure(candidates, args.repeat).items()}
        flops = 2 * rows * in_features * out_features
        report(f"float32 decode product, weight {out_features} x {in_features}, {rows} rows, streamed from memory",
               seconds, dict.fromkeys(seconds, flops), "MKL (F.linear)", "GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--weight-rows", type=int, default=5120)
    parser.add_argument("--weight-cols", type=int, default=5120)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds; the best of them is printed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small shapes (B=8, H=8, t=256, 1024 x 1024 weights)")
    parser.add_argument("--only", choices=["attention", "packed", "weights", "layouts", "held", "products"], default=None)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.heads, args.tokens, args.weight_rows, args.weight_cols = 8, 8, 256, 1024, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; best of {args.repeat} rounds")
    gen = torch.Generator().manual_seed(0)
    sections = {
        "attention": bench_attention, "packed": bench_packed_attention, "weights": bench_weights, "layouts": bench_layouts,
        "held": bench_held, "products": bench_products,
    }
    for name, run in sections.items():
        if args.only in (None, name):
            run(args, gen)


if __name__ == "__main__":
    main()
