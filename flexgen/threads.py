"""How many threads the engine computes with on the CPU, decided from the machine, not guessed.

PyTorch starts one OpenMP thread per core and every operation waits at a barrier for the
slowest of them. On a machine where another process keeps a core busy, one of those threads
gets half a core, so every operation takes twice as long as it should, plus scheduler
latency at each barrier: the quickstart measured 44-600 tokens/s with the default setting on
a busy 2-core machine and ~2,100 with ``OMP_NUM_THREADS=1``. Nothing told the user. So the
engine decides its intra-op threads itself, from three things:

1. **The cores this process may use**: its CPU affinity (``taskset``, ``numactl``, a batch
   scheduler's cpuset) and its cgroup's CPU quota (``docker --cpus``, Kubernetes limits),
   whichever is smaller (:func:`usable_cores`).
2. **The cores other processes keep busy now**: the CPU time of the cores above (from
   ``/proc/stat``) minus this process's own, over the last interval
   (:class:`CpuLoad`). A core counts as free when others use at most a quarter of it. The
   engine measures this while it runs, so the setting follows the machine: it is decided
   again between steps, at most every :data:`RESAMPLE_S` seconds, for free (two small file
   reads; no sampling pause except once, when nothing has been measured yet).
3. **The size of the work**: a matrix product too small to share (the quickstart's hidden
   size 64) costs more in OpenMP's fork and join than it saves, so each thread must get at
   least :data:`MIN_FLOPS_PER_THREAD` of the largest product of a decode step.

An explicit setting wins over all of this: ``hardware.threads`` in the config (or
``load_engine(threads=N)``), else ``OMP_NUM_THREADS`` in the environment. The engine applies
its setting (``torch.set_num_threads``) while it works and gives the caller's back when a
``generate`` returns; :meth:`ThreadChoice.describe` is the line the predict summary and the
bench print.

Helper threads never start OpenMP teams of their own: PyTorch's thread setting is global to
the process (a helper calling ``torch.set_num_threads(1)`` changes the compute thread's team
too, measured with torch 2.13), so the engine keeps parallel torch operations off its I/O
threads on the CPU (they read bytes; the compute thread converts and decompresses), and
places weights on several threads with one OpenMP thread each (:func:`single_threaded_ops`).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flexgen.errors import ConfigError

#: Fewest FLOPs of one matrix product per thread for a second thread to pay: OpenMP's fork and
#: join cost ~10-50 µs on a busy machine, a thread of AVX2 does ~40 GFLOP/s, so a product must
#: keep each thread busy for about as long as that overhead before splitting it helps.
MIN_FLOPS_PER_THREAD = 2_000_000

#: A core counts as free when other processes use at most this much of it.
FREE_CORE_SLACK = 0.25

#: Seconds between two measurements of the other processes' load while the engine runs.
RESAMPLE_S = 0.5

#: Shortest interval a load measurement is trusted over (``/proc/stat`` counts in 10 ms ticks).
MIN_WINDOW_S = 0.1


def parse_threads(value: object, key: str = "hardware.threads") -> int | None:
    """``auto`` (or None) -> None; a positive integer -> itself; anything else a one-line ConfigError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be 'auto' or a number of threads >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------- cores


def affinity_cores() -> int:
    """CPUs this process may run on (its affinity mask), or every CPU where that cannot be asked."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_quota_cores(cgroup_root: Path = Path("/sys/fs/cgroup"),
                       proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup, in cores (``docker --cpus=1.5`` -> 1.5); None: no quota.

    cgroup v2: ``cpu.max`` (``"150000 100000"``, or ``"max 100000"``) of the process's group and
    of every group above it, the smallest; cgroup v1: ``cpu.cfs_quota_us / cpu.cfs_period_us``
    of its ``cpu`` group (-1: none).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        group = group.strip().lstrip("/")
        if controllers == "":  # v2: walk up from the process's group to the root
            folder = cgroup_root / group if group else cgroup_root
            while True:
                quota = _v2_quota(folder / "cpu.max")
                if quota is not None:
                    quotas.append(quota)
                if folder == cgroup_root or cgroup_root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                folder = cgroup_root / name / group
                quota = _v1_quota(folder)
                if quota is not None:
                    quotas.append(quota)
                    break
    return min(quotas) if quotas else None


def _v2_quota(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores(affinity: int | None = None, quota: float | None | str = "read") -> int:
    """Cores this process may compute on: its affinity, capped by its cgroup quota (rounded up, at least 1).

    ``affinity`` and ``quota`` stand in for the machine's own (tests pass fake ones); ``quota``
    ``"read"`` reads the cgroup files, None means no quota.
    """
    cores = affinity if affinity is not None else affinity_cores()
    limit = cgroup_quota_cores() if quota == "read" else quota
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit - 1e-9)))
    return max(1, cores)


# --------------------------------------------------------------------------- load of other processes


def _cpu_ids() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


class CpuLoad:
    """Cores kept busy by other processes, over the interval since the last reading.

    Busy time is read from ``/proc/stat`` for the CPUs this process may use (user, nice,
    system, irq, softirq and steal: a hypervisor's stolen time is a busy core too) and this
    process's own CPU time (all its threads) is subtracted. Where ``/proc/stat`` does not exist
    (not Linux), :meth:`others` is None and the load is not taken into account.
    """

    def __init__(self, stat_path: Path = Path("/proc/stat")) -> None:
        self.stat_path = stat_path
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._cpus = _cpu_ids()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        """(wall time, busy CPU seconds of our CPUs, this process's CPU seconds), or None."""
        try:
            text = self.stat_path.read_text()
        except OSError:
            return None
        busy = 0
        for line in text.splitlines():
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            if self._cpus is not None and int(name[3:]) not in self._cpus:
                continue
            numbers = [int(v) for v in values[:8]] + [0] * (8 - len(values[:8]))
            user, nice, system, _idle, _iowait, irq, softirq, steal = numbers
            busy += user + nice + system + irq + softirq + steal
        own = os.times()
        return time.monotonic(), busy / self._ticks, own.user + own.system

    def window(self) -> float:
        """Seconds since the last reading (0 without one)."""
        return time.monotonic() - self._last[0] if self._last is not None else 0.0

    def others(self) -> float | None:
        """Cores other processes kept busy since the last reading; starts a new interval."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        busy = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, busy / (now[0] - last[0]))


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class ThreadChoice:
    """What the engine computes with, and why."""

    threads: int
    source: str  # "hardware.threads", "OMP_NUM_THREADS" or "auto"
    usable: int  # cores this process may use
    others: float | None = None  # cores other processes kept busy (auto only)
    work_cap: int | None = None  # threads the work size allows (auto only)

    def describe(self) -> str:
        """One line for the run summary and the bench: ``threads: 1 of 2 usable cores (auto: ...)``."""
        head = f"threads: {self.threads} of {self.usable} usable core{'s' if self.usable != 1 else ''}"
        if self.source != "auto":
            return f"{head} ({self.source})"
        why = []
        if self.others is not None:
            why.append(f"other processes busy on {self.others:.1f}")
        if self.work_cap is not None and self.work_cap < self.usable:
            why.append(f"work too small for more than {self.work_cap}")
        return f"{head} (auto{': ' + ', '.join(why) if why else ''})"

    def to_dict(self) -> dict[str, object]:
        return {"threads": self.threads, "source": self.source, "usable_cores": self.usable,
                "others_busy_cores": self.others, "work_cap": self.work_cap}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "ThreadChoice":
        """The inverse of :meth:`to_dict` (the metrics JSON holds the dict)."""
        return cls(int(values["threads"]), str(values["source"]), int(values["usable_cores"]),
                   values.get("others_busy_cores"), values.get("work_cap"))


def decide(setting: int | None, usable: int, others: float | None, work_flops: float | None,
           environment: str | None = None) -> ThreadChoice:
    """The thread count for ``setting`` (None: auto) on ``usable`` cores, ``others`` of them busy.

    ``work_flops``: FLOPs of the largest matrix product of a decode step (None: unknown, no
    cap). ``environment``: the value of ``OMP_NUM_THREADS``, honoured when no setting is given.
    """
    if setting is not None:
        return ThreadChoice(setting, "hardware.threads", usable)
    if environment:
        try:
            wanted = int(environment.split(",")[0])
        except ValueError:
            wanted = 0
        if wanted >= 1:
            return ThreadChoice(wanted, "OMP_NUM_THREADS", usable)
    threads = usable
    if others is not None:
        threads = min(threads, max(1, math.floor(usable - others + FREE_CORE_SLACK)))
    cap = None
    if work_flops is not None:
        cap = max(1, int(work_flops // MIN_FLOPS_PER_THREAD))
        threads = min(threads, cap)
    return ThreadChoice(max(1, threads), "auto", usable, others, cap)


class ThreadGovernor:
    """The engine's thread setting: decided, applied while it works, decided again as the load changes."""

    def __init__(self, setting: int | None, work_flops: float | None) -> None:
        self.setting = setting
        self.work_flops = work_flops
        self.usable = usable_cores()
        self._load = CpuLoad() if self._needs_load() else None
        self.choice: ThreadChoice | None = None

    def _needs_load(self) -> bool:
        """The load matters only when auto may choose more than one thread."""
        if self.setting is not None or os.environ.get("OMP_NUM_THREADS"):
            return False
        return decide(None, self.usable, None, self.work_flops).threads > 1

    def update(self, force: bool = False) -> ThreadChoice:
        """Decide (again, when the last measurement is :data:`RESAMPLE_S` old) and apply the setting.

        Applied every time, decided anew or not: :meth:`applied` gives the caller's setting
        back after each ``generate``, so the next one must set the engine's again.
        """
        if self.choice is not None and not force and (self._load is None or self._load.window() < RESAMPLE_S):
            self._apply(self.choice.threads)
            return self.choice
        others = None
        if self._load is not None:
            if self._load.window() < MIN_WINDOW_S:
                time.sleep(MIN_WINDOW_S - self._load.window())  # nothing measured yet: once, 0.1 s at most
            others = self._load.others()
        choice = decide(self.setting, self.usable, others, self.work_flops, os.environ.get("OMP_NUM_THREADS"))
        self._apply(choice.threads)
        self.choice = choice
        return choice

    @staticmethod
    def _apply(threads: int) -> None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    @contextmanager
    def applied(self) -> Iterator[ThreadChoice]:
        """Compute with the engine's setting inside; the caller's setting is given back afterwards."""
        import torch

        before = torch.get_num_threads()
        try:
            yield self.update()
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


@contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Torch operations with one OpenMP thread each inside: for work spread over several Python threads.

    Placing a model runs a few tensors at once on a thread pool; with the default setting each
    of them would start a team of one thread per core, N x N threads on N cores.
    """
    with intra_op_threads(1):
        yield


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Torch operations on ``threads`` OpenMP threads inside; the caller's setting is given back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
