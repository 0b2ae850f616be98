"""The machine, as the cost model sees it: memory capacities, link bandwidths, compute rates.

A :class:`HardwareProfile` comes from one of three places:

* :func:`measure_hardware` times a few small copies and matrix products on this machine (a
  few seconds), and caches the result as JSON under ``$FLEXGEN_CACHE`` (default
  ``~/.cache/flexgen``), keyed by the machine, so ``flexgen bench`` and ``flexgen policy``
  measure once;
* :func:`load_hardware` reads a YAML (or JSON) file, so a policy can be planned for a machine
  one does not have;
* :data:`PRESETS`: ``t4-paper`` (the machine of the FlexGen paper) and ``h200``.

Without CUDA the "gpu" of the profile is the compute device, i.e. the CPU: the gpu and cpu
tiers are then the same RAM (``shared_memory`` is true), "host to device" is a memcpy, and
the matmul rate is the CPU's.

Capacities can be capped (``gpu_memory: 24GiB``) so that one machine can stand in for a
smaller one; :func:`parse_bytes` reads such sizes and raises a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from flexgen.errors import ConfigError
from flexgen.paths import cache_root
from flexgen.threads import intra_op_threads, usable_cores

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
GB = 10**9

#: Bump when measurement changes, so stale cached profiles are measured again.
PROFILE_VERSION = 5

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_bytes(value: Any, key: str) -> int:
    """A size in bytes from ``24GiB``, ``16GB``, ``512MiB``, ``1.5TB``, ``1000`` or an int.

    GB/MB/... are powers of ten and GiB/MiB/... powers of two, as usual; a bare number is
    bytes. Anything else is a ConfigError naming ``key``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 24GiB or 16GB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(_NUMBER + r"([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(
        f"{key}: expected a size such as 24GiB, 16GB or 512MiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}"
    )


def parse_rate(value: Any, key: str, unit: str) -> float:
    """A rate from ``12GB/s``, ``65TFLOP/s``, ``65 TFLOPS`` or a plain number (per second).

    ``unit`` is ``"B"`` (bytes per second: GB/s, GiB/s, ...) or ``"FLOP"``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a rate, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{key}: a rate must be positive, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if unit == "B":
            match = re.fullmatch(_NUMBER + r"([A-Za-z]*)\s*/\s*s\s*", text)
            if match and match.group(2).lower() in _UNITS:
                rate = float(match.group(1)) * _UNITS[match.group(2).lower()]
                if rate > 0:
                    return rate
        else:
            match = re.fullmatch(_NUMBER + r"([kKmMgGtTpP]?)(?:FLOP/s|FLOPS|flop/s|flops)\s*", text)
            if match:
                rate = float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
                if rate > 0:
                    return rate
    example = "12GB/s" if unit == "B" else "65TFLOP/s"
    raise ConfigError(f"{key}: expected a positive rate such as {example}, got {value!r}")


def format_bytes(n: float) -> str:
    """``23.5 GiB``: for messages and tables."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_DTYPE_ALIASES = {
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
}


@dataclass(frozen=True)
class HardwareProfile:
    """What one machine can hold and move, in bytes, bytes per second and FLOP per second.

    Rates are *achieved* rates (what PyTorch reaches on large, contiguous operations), not
    datasheet peaks: the cost model divides work by them and predicts wall-clock time.
    """

    name: str
    #: "cuda" when a GPU computes; "cpu" when the compute device is the CPU itself.
    device: str
    gpu_memory: int
    cpu_memory: int
    disk_memory: int
    #: host -> device and device -> host, pinned host memory.
    h2d_bandwidth: float
    d2h_bandwidth: float
    disk_read_bandwidth: float
    disk_write_bandwidth: float
    #: matrix-product rate on the compute device, per dtype.
    gpu_flops_fp16: float
    gpu_flops_bf16: float
    gpu_flops_fp32: float
    #: bytes read + written per second by a large copy on the compute device.
    gpu_memory_bandwidth: float
    #: fp32 matrix-product rate of the host CPU.
    cpu_flops: float
    #: FLOP/s of decode attention on the host over an fp16 cache (FlexGen's CPU delegation,
    #: as ``flexgen.attention.cpu`` computes it: convert to fp32, two batched products).
    cpu_attention_flops: float
    #: bytes read + written per second by a large copy in host memory.
    cpu_memory_bandwidth: float
    #: fixed cost of one (layer, GPU batch) task: kernel launches, Python, synchronisation.
    task_overhead_s: float = 2e-4
    #: bytes of float16 output per second that int4 group-wise decompression produces on the
    #: compute device, and on the host; None: a twelfth of the memory bandwidth (several
    #: float32 elementwise passes). Measured with the registered int4 compressor.
    decompress_bandwidth: float | None = None
    cpu_decompress_bandwidth: float | None = None
    #: host <-> device copies from/to ordinary (pageable) memory, used when a policy does not
    #: pin (``pin_weights: false``); None: half the pinned rate (an assumption).
    h2d_pageable_bandwidth: float | None = None
    d2h_pageable_bandwidth: float | None = None
    #: True when gpu and cpu tiers are the same memory (no CUDA: compute runs on the CPU).
    shared_memory: bool = False
    #: where the figures come from: "measured on <host> <date>", "preset", a file name.
    source: str = ""

    def gpu_flops(self, dtype: str) -> float:
        """Matmul rate on the compute device for ``float16`` / ``bfloat16`` / ``float32``."""
        key = _DTYPE_ALIASES.get(str(dtype).replace("torch.", ""))
        if key is None:
            raise ConfigError(f"dtype: expected float16, bfloat16 or float32, got {dtype!r}")
        return getattr(self, f"gpu_flops_{key}")

    def decompress_rate(self, on_host: bool) -> float:
        """Decompressed bytes per second on the compute device (or the host, ``on_host``)."""
        if on_host or self.shared_memory:
            return self.cpu_decompress_bandwidth or self.cpu_memory_bandwidth / 12
        return self.decompress_bandwidth or self.gpu_memory_bandwidth / 12

    def unpinned(self) -> "HardwareProfile":
        """This profile as seen by copies from pageable memory (a policy that does not pin)."""
        return dataclasses.replace(
            self,
            h2d_bandwidth=self.h2d_pageable_bandwidth or self.h2d_bandwidth / 2,
            d2h_bandwidth=self.d2h_pageable_bandwidth or self.d2h_bandwidth / 2,
        )

    def with_caps(self, gpu_memory: Any = None, cpu_memory: Any = None, disk_memory: Any = None) -> "HardwareProfile":
        """This profile with some capacities replaced (``"24GiB"``, bytes, or None to keep).

        A cap larger than what a *measured* machine has is accepted with a warning: planning
        for a machine one does not have is legitimate, running such a plan here is not.
        """
        changes = {}
        for key, value in (("gpu_memory", gpu_memory), ("cpu_memory", cpu_memory), ("disk_memory", disk_memory)):
            if value is None:
                continue
            size = parse_bytes(value, f"hardware.{key}")
            if size <= 0:
                raise ConfigError(f"hardware.{key}: must be more than 0 bytes, got {value!r}")
            if self.source.startswith("measured") and size > getattr(self, key):
                warnings.warn(
                    f"hardware.{key} = {format_bytes(size)} is more than this machine has "
                    f"({format_bytes(getattr(self, key))}); a plan for it may not run here",
                    stacklevel=2,
                )
            changes[key] = size
        if not changes:
            return self
        caps = ", ".join(f"{k}={format_bytes(v)}" for k, v in changes.items())
        return dataclasses.replace(self, source=f"{self.source} (capped: {caps})", **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "hardware") -> "HardwareProfile":
        """Build from a dict whose sizes and rates may be strings (``24GiB``, ``12GB/s``).

        Missing keys are taken from ``base`` (a preset name) when given, else they are an
        error; unknown keys are an error, naming ``where``.
        """
        values = dict(values)
        base_name = values.pop("base", None)
        merged: dict[str, Any] = {}
        if base_name is not None:
            if base_name not in PRESETS:
                raise ConfigError(f"{where}: base: unknown preset {base_name!r}; presets: {', '.join(PRESETS)}")
            merged = PRESETS[base_name].to_dict()
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown hardware key {unknown[0]!r}; known keys: base, {', '.join(known)}")
        for key, value in values.items():
            if key in ("gpu_memory", "cpu_memory", "disk_memory"):
                merged[key] = parse_bytes(value, f"{where}: {key}")
            elif value is None and known[key].default is None:
                merged[key] = None
            elif key.endswith("_bandwidth"):
                merged[key] = parse_rate(value, f"{where}: {key}", "B")
            elif "flops" in key:
                merged[key] = parse_rate(value, f"{where}: {key}", "FLOP")
            elif key == "task_overhead_s":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ConfigError(f"{where}: task_overhead_s must be a number of seconds >= 0, got {value!r}")
                merged[key] = float(value)
            elif key == "shared_memory":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: shared_memory must be true or false, got {value!r}")
                merged[key] = value
            elif key == "device":
                if value not in ("cuda", "cpu"):
                    raise ConfigError(f"{where}: device must be cuda or cpu, got {value!r}")
                merged[key] = value
            else:
                merged[key] = str(value)
        merged.setdefault("name", Path(where).stem if where != "hardware" else "custom")
        merged.setdefault("device", "cuda")
        missing = sorted(k for k, f in known.items() if k not in merged and f.default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{where}: missing hardware key {missing[0]!r} (or give base: t4-paper / h200 to start from a preset)")
        return cls(**merged)


# --------------------------------------------------------------------------- presets

#: The machine of the FlexGen paper (Sheng et al., ICML 2023, section 6): a GCP instance with
#: one 16 GB NVIDIA T4, 208 GB of DRAM and a 1.5 TB SSD, the GPU on PCIe 3.0 x16.
#: Rates are achieved figures, not peaks: the T4's fp16 tensor-core peak is 65 TFLOP/s, but at
#: its 70 W limit large cuBLAS fp16 products reach ~20-25; FlexGen's own fitted cost-model
#: constants (experimental/cost_model.py of FMInference/FlexGen) say 21.2 TFLOP/s for prefill
#: matmuls, 12.9 GB/s CPU->GPU, 12.3 GFLOP/s for CPU attention; we use 21 TFLOP/s, 12 GB/s
#: both ways, and 12 GFLOP/s. Disk: 2 GB/s read as the paper states; 1 GB/s write is
#: our assumption. Turing has no bf16 tensor cores, so bf16 runs at the fp32 rate (~4.5 of 8.1
#: peak). Memory bandwidth 320 GB/s peak, ~240 achieved.
T4_PAPER = HardwareProfile(
    name="t4-paper",
    device="cuda",
    gpu_memory=16 * GB,
    cpu_memory=208 * GB,
    disk_memory=1500 * GB,
    h2d_bandwidth=12 * GB,
    d2h_bandwidth=12 * GB,
    disk_read_bandwidth=2 * GB,
    disk_write_bandwidth=1 * GB,
    gpu_flops_fp16=21e12,
    gpu_flops_bf16=4.5e12,
    gpu_flops_fp32=4.5e12,
    gpu_memory_bandwidth=240 * GB,
    cpu_flops=1.0e12,
    cpu_attention_flops=12e9,
    cpu_memory_bandwidth=40 * GB,
    task_overhead_s=2e-4,
    decompress_bandwidth=20 * GB,      # assumed: ~1/12 of the memory bandwidth
    cpu_decompress_bandwidth=1 * GB,   # assumed
    source="preset t4-paper (FlexGen paper's GCP T4 machine; achieved rates, see flexgen/planner/hardware.py)",
)

#: The lent H200 machine (/work/.library/device/KINDS.md): 139 GiB usable GPU memory, 128 GiB
#: RAM, 64 GiB disk; a device copy moves ~4.3 TB/s (read + write), an 8192^3 bf16 product
#: ~790 TFLOP/s (fp16 the same on Hopper); fp32 without TF32 ~50 TFLOP/s (our estimate).
#: Host links PCIe 5 ~55 GB/s pinned. Disk and CPU rates are guesses: measure the machine.
H200 = HardwareProfile(
    name="h200",
    device="cuda",
    gpu_memory=139 * GiB,
    cpu_memory=128 * GiB,
    disk_memory=64 * GiB,
    h2d_bandwidth=55 * GB,
    d2h_bandwidth=55 * GB,
    disk_read_bandwidth=2 * GB,
    disk_write_bandwidth=1 * GB,
    gpu_flops_fp16=790e12,
    gpu_flops_bf16=790e12,
    gpu_flops_fp32=50e12,
    gpu_memory_bandwidth=4300 * GB,
    cpu_flops=0.5e12,
    cpu_attention_flops=20e9,
    cpu_memory_bandwidth=30 * GB,
    task_overhead_s=1e-4,
    decompress_bandwidth=300 * GB,     # assumed: ~1/14 of the copy rate; measure
    cpu_decompress_bandwidth=1 * GB,   # assumed
    source="preset h200 (KINDS.md figures; disk and CPU rates guessed)",
)

PRESETS: dict[str, HardwareProfile] = {p.name: p for p in (T4_PAPER, H200)}


# --------------------------------------------------------------------------- files


def load_hardware(path: str | os.PathLike) -> HardwareProfile:
    """A profile from a YAML/JSON file, or a preset name (``t4-paper``, ``h200``).

    The file is a mapping of :class:`HardwareProfile` keys; ``base: t4-paper`` starts from a
    preset so only the differences need be written. Errors name the file.
    """
    text_path = str(path)
    if text_path in PRESETS:
        return PRESETS[text_path]
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"hardware file {text_path!r} not found (presets: {', '.join(PRESETS)})")
    try:
        import yaml

        values = yaml.safe_load(file.read_text())
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError, OSError
        raise ConfigError(f"hardware file {text_path}: cannot be read as YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"hardware file {text_path}: expected a mapping of hardware keys, got {type(values).__name__}")
    values.setdefault("source", f"file {text_path}")
    return HardwareProfile.from_dict(values, where=f"hardware file {text_path}")


def save_hardware(profile: HardwareProfile, path: str | os.PathLike) -> None:
    """Write a profile as YAML (readable back with :func:`load_hardware`)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- measurement


def machine_key(device: str) -> str:
    """A short stable id of this machine and compute device, naming its cached profile."""
    import torch

    parts = [platform.node(), platform.machine(), platform.processor(), str(os.cpu_count()), device, torch.__version__]
    if device == "cuda":
        parts.append(torch.cuda.get_device_name(0))
        parts.append(str(torch.cuda.get_device_properties(0).total_memory))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _best_time(fn: Callable[[], None], sync: Callable[[], None], repeats: int, budget_s: float = 1.0) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up; stops early past ``budget_s``."""
    fn()
    sync()
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return max(best, 1e-9)


def _matmul_rate(torch, device, dtype, n: int, sync, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_time(lambda: torch.matmul(a, b), sync, repeats)


def _copy_rate(src, dst, sync, repeats: int = 5) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (counting the bytes once)."""
    return src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src, non_blocking=True), sync, repeats)


def _disk_rates(directory: Path, size: int) -> tuple[float, float]:
    """Write then read a ``size``-byte file in ``directory``, bypassing the page cache for the read.

    The write is timed to fsync; before reading, the file's pages are dropped from the page
    cache (posix_fadvise DONTNEED), so the read comes from the device. Where that is not
    possible (not Linux) the read may be served from memory and look fast.
    """
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MiB)
    handle, name = tempfile.mkstemp(prefix="flexgen-disk-probe-", dir=directory)
    try:
        start = time.perf_counter()
        with os.fdopen(handle, "wb", buffering=0) as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write = size / (time.perf_counter() - start)
        fd = os.open(name, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while os.read(fd, 16 * MiB):
                pass
            read = size / (time.perf_counter() - start)
        finally:
            os.close(fd)
    finally:
        os.unlink(name)
    return read, write


def _cpu_attention_rate(torch, batch: int = 8, heads: int = 16, head_dim: int = 64, length: int = 1024) -> float:
    """FLOP/s of decode attention on the host over an fp16 cache, the way CPU attention computes it."""
    try:
        from flexgen.attention.cpu import CPUAttention

        attend = CPUAttention().decode
    except Exception:  # keep measuring even if the plugin cannot be imported
        def attend(q, k, v, valid):
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)).softmax(-1)
            return torch.matmul(s, v.float()).to(q.dtype)

    q = torch.randn(batch, heads, 1, head_dim).half()
    k = torch.randn(batch, heads, length, head_dim).half()
    v = torch.randn(batch, heads, length, head_dim).half()
    valid = torch.ones(batch, length, dtype=torch.bool)
    seconds = _best_time(lambda: attend(q, k, v, valid), lambda: None, repeats=5)
    return 4 * batch * heads * length * head_dim / seconds


def _task_overhead(torch, device: str, sync) -> float:
    """Seconds of one (layer, batch) task when its arithmetic is negligible: launch and Python cost.

    Runs the real attention and MLP functions of :mod:`flexgen.models.opt` on a tiny shape, so
    the number of operations (and kernel launches) is that of a real task.
    """
    try:
        from flexgen.models import opt
        import torch.nn.functional as F

        spec = opt.OPTSpec(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, ffn_dim=128,
                           max_positions=64, word_embed_proj_dim=64)
        weights = {}
        for index in (1, 2):
            for w in opt.layer_weights(spec, index):
                weights[w.local] = torch.randn(w.shape, device=device) * 0.02
        x = torch.randn(2, 1, 64, device=device)
        cache_k = torch.randn(2, 4, 16, 16, device=device)

        def task() -> None:
            q, k, v = opt.attention_in(spec, weights, x)
            kk, vv = torch.cat([cache_k, k], dim=2), torch.cat([cache_k, v], dim=2)
            a = F.scaled_dot_product_attention(q, kk, vv, scale=1.0)
            y = opt.attention_out(spec, weights, x, a)
            opt.mlp(spec, weights, y)

        return _best_time(task, sync, repeats=20) / 2  # an attention task and an MLP task
    except Exception:
        return 2e-4


def _decompress_rate(torch, device: str, sync, n: int) -> float | None:
    """Bytes of float16 output per second of the registered int4 compressor's decompression."""
    try:
        from flexgen import registry

        compressor = registry.load("compressor", "int4")()
        x = torch.randn(n, n, device=device).half()
        parts = compressor.compress(x)
        seconds = _best_time(lambda: compressor.decompress(parts, x.shape, torch.float16), sync, repeats=3)
        return x.numel() * 2 / seconds
    except Exception:  # no int4 compressor: fall back to the memory-bandwidth rule
        return None


def measure_hardware(
    device: str = "auto",
    disk_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    refresh: bool = False,
    quick: bool = False,
) -> HardwareProfile:
    """Measure this machine (seconds), or return its cached profile.

    ``device``: ``"auto"`` (cuda when available), ``"cuda"`` or ``"cpu"``. ``disk_dir``: where
    the disk probe writes (the offload folder; default the cache folder). ``quick`` uses
    smaller probes (tests). The result is cached as JSON in :func:`cache_dir` under a key of
    the machine; ``refresh`` measures again.
    """
    import psutil
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if str(device).startswith("cuda") else str(device)
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device: expected auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for, but PyTorch sees no CUDA device")

    cache_file = cache_root() / f"hardware-{device}-{machine_key(device)}.json"
    if use_cache and not refresh and cache_file.is_file():
        try:
            values = json.loads(cache_file.read_text())
            if values.pop("profile_version", None) == PROFILE_VERSION:
                return HardwareProfile(**values)
        except (ValueError, TypeError):
            pass  # a corrupt or old cache is measured again

    disk_path = Path(disk_dir) if disk_dir is not None else cache_root()
    disk_path.mkdir(parents=True, exist_ok=True)
    copy_bytes = (16 if quick else 128) * MiB
    cpu_n = 256 if quick else 1024

    cpu_sync = lambda: None  # noqa: E731
    host_a = torch.empty(copy_bytes // 4, dtype=torch.float32).fill_(1.0)
    host_b = torch.empty_like(host_a)
    # The machine's rates, on every core this process may use, whatever thread count the caller
    # (or an engine's governor, on a busy machine) left set: the profile is cached per machine.
    with intra_op_threads(usable_cores()):
        cpu_copy = _copy_rate(host_a, host_b, cpu_sync)
        cpu_flops = _matmul_rate(torch, "cpu", torch.float32, cpu_n, cpu_sync)
        cpu_attention = _cpu_attention_rate(torch, length=256 if quick else 1024)
        cpu_decompress = _decompress_rate(torch, "cpu", cpu_sync, 256 if quick else 1024)
        cpu_half_flops = {}
        if device != "cuda":
            for key, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                try:
                    cpu_half_flops[key] = _matmul_rate(torch, "cpu", dt, cpu_n // 2, cpu_sync, repeats=3)
                except RuntimeError:  # no half-precision matmul on this CPU build
                    cpu_half_flops[key] = cpu_flops / 10
    disk_read, disk_write = _disk_rates(disk_path, (16 if quick else 128) * MiB)
    cpu_memory = psutil.virtual_memory().total
    disk_memory = shutil.disk_usage(disk_path).free

    if device == "cuda":
        sync = torch.cuda.synchronize
        gpu_n = 2048 if quick else 8192
        pinned = torch.empty(copy_bytes // 4, dtype=torch.float32, pin_memory=True).fill_(1.0)
        on_gpu = torch.empty(copy_bytes // 4, dtype=torch.float32, device="cuda")
        h2d = _copy_rate(pinned, on_gpu, sync)
        d2h = _copy_rate(on_gpu, pinned, sync)
        h2d_pageable = _copy_rate(host_a, on_gpu, sync, repeats=3)
        d2h_pageable = _copy_rate(on_gpu, host_b, sync, repeats=3)
        other = torch.empty_like(on_gpu)
        gpu_bw = 2 * _copy_rate(on_gpu, other, sync)  # bytes read + written
        flops = {key: _matmul_rate(torch, "cuda", dt, gpu_n, sync)
                 for key, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32))}
        free, total = torch.cuda.mem_get_info()
        gpu_memory = total
        overhead = _task_overhead(torch, "cuda", sync)
        decompress = _decompress_rate(torch, "cuda", sync, 2048 if quick else 8192)
        name = torch.cuda.get_device_name(0)
        del pinned, on_gpu, other
        torch.cuda.empty_cache()
        shared = False
    else:
        # The compute device is the CPU: "host to device" is a copy within RAM, and the gpu
        # tier is the same memory as the cpu tier.
        h2d = d2h = cpu_copy
        gpu_bw = 2 * cpu_copy
        flops = {"fp32": cpu_flops, **cpu_half_flops}
        gpu_memory = cpu_memory
        h2d_pageable = d2h_pageable = None
        overhead = _task_overhead(torch, "cpu", cpu_sync)
        decompress = cpu_decompress
        name = platform.processor() or platform.machine()
        shared = True

    profile = HardwareProfile(
        name=name,
        device=device,
        gpu_memory=int(gpu_memory),
        cpu_memory=int(cpu_memory),
        disk_memory=int(disk_memory),
        h2d_bandwidth=h2d,
        d2h_bandwidth=d2h,
        disk_read_bandwidth=disk_read,
        disk_write_bandwidth=disk_write,
        gpu_flops_fp16=flops["fp16"],
        gpu_flops_bf16=flops["bf16"],
        gpu_flops_fp32=flops["fp32"],
        gpu_memory_bandwidth=gpu_bw,
        cpu_flops=cpu_flops,
        cpu_attention_flops=cpu_attention,
        cpu_memory_bandwidth=2 * cpu_copy,
        task_overhead_s=overhead,
        decompress_bandwidth=decompress,
        cpu_decompress_bandwidth=cpu_decompress,
        h2d_pageable_bandwidth=h2d_pageable,
        d2h_pageable_bandwidth=d2h_pageable,
        shared_memory=shared,
        source=f"measured on {platform.node()} {time.strftime('%Y-%m-%d')} ({device})",
    )
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps({"profile_version": PROFILE_VERSION, **profile.to_dict()}, indent=1))
        except OSError as exc:
            warnings.warn(f"could not cache the hardware profile in {cache_file}: {exc}", stacklevel=2)
    return profile


def get_hardware(spec: str | os.PathLike | HardwareProfile | None = None, device: str = "auto", **caps: Any) -> HardwareProfile:
    """Resolve ``--hardware``: a profile, a preset name, a YAML file, or None (measure / cache).

    ``caps`` (``gpu_memory="24GiB"`` ...) replace capacities afterwards.
    """
    if isinstance(spec, HardwareProfile):
        profile = spec
    elif spec is None or str(spec) in ("", "auto", "measure"):
        profile = measure_hardware(device)
    else:
        profile = load_hardware(spec)
    return profile.with_caps(**caps)
