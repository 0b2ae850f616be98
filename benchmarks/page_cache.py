"""Files in and out of the page cache, for the benchmarks that time reads from a cold or a warm disk.

Imported by the scripts beside it (run as ``python benchmarks/<name>.py``, which puts this
folder on the import path).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

READ_CHUNK = 16 << 20


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Write back, then drop, every page of these files from the page cache: the next read goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: Iterable[Path]) -> int:
    """Read every file front to back in 16 MiB reads (which leaves them cached); the bytes read."""
    view, total = memoryview(bytearray(READ_CHUNK)), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total
