"""Compile a C kernel shipped with the package into a shared library, once per machine, and load it.

Why at first use rather than at install time: the package installs as pure Python (wheels,
editable installs and plain checkouts behave alike), the kernel is compiled for the CPU it
runs on, and a machine without a compiler loses only the kernel, never the install.

**One OpenMP runtime in the process.** The kernels split their work with OpenMP. A second
OpenMP runtime beside PyTorch's would keep its own threads spinning while PyTorch's do the
same after each operation, two teams fighting for the same cores. So the library is linked
against the runtime PyTorch already loaded (found in ``/proc/self/maps``); the dynamic loader
then gives the kernel that very library, and both share one team of threads. The object is
compiled with ``-fopenmp`` and linked with ``--no-undefined``: a compiler whose OpenMP calls
that runtime does not provide fails here, with a reason, not at the first product.

The cache key is the source and the headers beside it, the compiler's identity and command,
and the runtime's path: a changed kernel, compiler or PyTorch install builds again. The
library is written under a temporary name and renamed into place, so processes building at
once never load half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cached_property
from pathlib import Path

import torch

from flexgen.dtypes import cpu_flags
from flexgen.errors import ConfigError
from flexgen.paths import cache_root

#: Seconds a compiler may take before the kernel is given up for this process.
COMPILE_TIMEOUT_S = 120

#: Set to 0 (or off) in the environment, no native kernel is built or used: PyTorch computes
#: everything, to compare or to rule the kernels out.
ENV_VAR = "FLEXGEN_NATIVE_KERNELS"
_OFF, _ON = ("0", "off", "false", "no"), ("", "1", "on", "true", "yes")

#: Names of the OpenMP runtimes PyTorch builds load (GNU, Intel, LLVM).
OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def native_kernels_allowed() -> bool:
    """``FLEXGEN_NATIVE_KERNELS``, checked: False for 0/off/false/no, True when unset or 1/on/true/yes."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _OFF + _ON:
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 1 or 0 (on or off)")
    return value not in _OFF


class KernelUnavailable(Exception):
    """The kernel cannot be built or loaded here; the message says why in a few words."""


def kernels_dir() -> Path:
    """Where built kernels are cached: ``$FLEXGEN_CACHE/kernels``."""
    return cache_root() / "kernels"


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry arguments), else ``cc`` or ``gcc`` on the PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc"):
        found = shutil.which(name)
        if found:
            return [found]
    raise KernelUnavailable("no C compiler found (cc, gcc or $CC)")


def openmp_runtime() -> Path:
    """The OpenMP runtime library loaded into this process (PyTorch's), from ``/proc/self/maps``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as exc:
        raise KernelUnavailable(f"cannot read /proc/self/maps ({exc.strerror})") from None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith(OPENMP_RUNTIMES) and ".so" in fields[5]:
            return Path(fields[5].strip())
    raise KernelUnavailable("PyTorch loaded no OpenMP runtime")


def build(source: Path, flags: list[str]) -> ctypes.CDLL:
    """``source`` compiled with ``flags`` (and ``-O3 -fPIC -fopenmp``), linked against this
    process's OpenMP runtime, from the cache when built before; raises :class:`KernelUnavailable`."""
    cc = compiler()
    runtime = openmp_runtime()
    compile_cmd = [*cc, "-O3", "-fPIC", "-fopenmp", *flags]
    identity = _compiler_identity(cc)
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]  # what it may include
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), *headers, identity.encode(), " ".join(compile_cmd).encode(),
                     str(runtime).encode()])
    ).hexdigest()[:16]
    target = kernels_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        _compile(cc, compile_cmd, source, runtime, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelUnavailable(f"the built kernel does not load ({exc})") from None


def _compiler_identity(cc: list[str]) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"the C compiler {cc[0]} does not run ({exc})") from None
    if done.returncode != 0:
        raise KernelUnavailable(f"the C compiler {cc[0]} does not run (--version exited {done.returncode})")
    return done.stdout.strip()


def _compile(cc: list[str], compile_cmd: list[str], source: Path, runtime: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        obj = Path(scratch) / f"{source.stem}.o"
        lib = Path(scratch) / target.name
        steps = (
            [*compile_cmd, "-c", str(source), "-o", str(obj)],
            [*cc, "-shared", str(obj), str(runtime), "-lm", "-Wl,--no-undefined", "-o", str(lib)],
        )
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailable(f"compiling {source.name} failed ({exc})") from None
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise KernelUnavailable(f"compiling {source.name} failed: {first}")
        os.replace(lib, target)


class AVX2Kernel:
    """A C file of this package with AVX2 and FMA code, built on first use: its library, or why not.

    ``signatures`` maps each exported function to its ``ctypes`` argument types. The kernel is
    usable on x86-64 Linux where PyTorch runs AVX2 (or AVX-512) code, which implies FMA.
    ``features`` names further instruction sets the code uses, as ``/proc/cpuinfo`` spells them
    (e.g. ``f16c``, float16 conversion): each is compiled for (``-m<feature>``) and required of
    the CPU.
    """

    FLAGS = ["-mavx2", "-mfma", "-funroll-loops"]

    def __init__(self, source: Path, signatures: dict[str, list], features: tuple[str, ...] = ()) -> None:
        self.source = source
        self.signatures = signatures
        self.features = features

    @property
    def flags(self) -> list[str]:
        """The compiler flags of this kernel: :data:`FLAGS` and one ``-m<feature>`` per feature."""
        return self.FLAGS + [f"-m{feature}" for feature in self.features]

    @cached_property
    def _loaded(self) -> ctypes.CDLL | str:
        if not native_kernels_allowed():
            return f"turned off by {ENV_VAR}={os.environ[ENV_VAR]}"
        if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
            return f"built for x86-64 Linux only (this is {sys.platform} on {platform.machine()})"
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in ("AVX2", "AVX512"):
            return f"the CPU (or ATEN_CPU_CAPABILITY) offers {capability}, not AVX2 with FMA"
        missing = [feature for feature in self.features if feature not in cpu_flags()]
        if missing:
            return f"the CPU lacks {', '.join(missing)} (not in /proc/cpuinfo's flags)"
        try:
            lib = build(self.source, self.flags)
        except KernelUnavailable as exc:
            return str(exc)
        for name, argtypes in self.signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = None
        return lib

    def available(self) -> bool:
        """Whether the kernel is built and usable in this process (builds it the first time)."""
        return not isinstance(self._loaded, str)

    def unavailable_reason(self) -> str | None:
        """Why the kernel is not usable here, or None when it is."""
        return self._loaded if isinstance(self._loaded, str) else None

    def call(self, name: str, *args) -> None:
        """Call the exported C function ``name``; raises RuntimeError where the kernel is not available.

        While a torch profiler records, the call shows in its table as ``flexgen::<name>`` (a C
        call is invisible to it otherwise; marking every call would cost 9 µs each).
        """
        if isinstance(self._loaded, str):
            raise RuntimeError(f"{self.source.name} is not available: {self._loaded}")
        function = getattr(self._loaded, name)
        if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
            with torch.profiler.record_function(profiler_name(name)):
                function(*args)
        else:
            function(*args)


def profiler_name(function: str) -> str:
    """The name a kernel's calls carry in a torch profiler's table: its C name, ``flexgen_`` dropped."""
    return "flexgen::" + function.removeprefix("flexgen_")
