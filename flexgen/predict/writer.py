"""The output file: one JSON line per prompt, appended block by block, safe against crashes.

Why it is shaped like this: a run may die at any instant (``kill -9``, power loss) and the same
command must then finish the job with every prompt id exactly once in the file and no line ever
half-written.

* Each finished block is encoded in full, appended with a single ``write`` to a file opened
  ``O_APPEND``, then ``fsync``-ed before the next block starts. A block is therefore either on
  disk, or (at worst, after a crash during the write) its tail is torn.
* On start, :func:`scan_output` reads what is there: the ids done, and whether the last line is
  torn (no final newline, or not valid JSON: a crash can also leave garbage such as NUL bytes at
  the end). :func:`repair_output` cuts such a tail off (and logs it) right before new lines are
  appended; the prompts it held are simply generated again.
* A bad line *before* the last good one is not a crash artefact; that file is not ours to fix,
  so it is an error naming the line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from flexgen.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class OutputState:
    """What an existing output file holds."""

    done_ids: set = field(default_factory=set)
    good_bytes: int = 0  # length of the valid prefix
    torn_bytes: int = 0  # bytes after it (a torn tail), 0 when the file is clean
    torn_lines: int = 0


def scan_output(path: Path) -> OutputState:
    """Read an output file line by line without changing it; a missing file is an empty one."""
    state = OutputState()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return state
    except OSError as exc:
        raise ConfigError(f"output.path: cannot read {path} ({exc.strerror or exc})") from exc
    with f:
        offset = 0
        first_bad: int | None = None  # line number of the first bad line after the last good one
        bad_lines = 0
        for number, line in enumerate(f, start=1):
            offset += len(line)
            obj = _parse(line) if line.endswith(b"\n") else None  # no newline: torn
            if obj is None:
                first_bad = first_bad or number
                bad_lines += 1
                continue
            if first_bad is not None:
                # A bad line followed by a good one is not crash damage: not our file to fix.
                raise ConfigError(
                    f"output.path: {path} line {first_bad} is not a flexgen output line; move the file away or "
                    "choose another output.path"
                )
            state.done_ids.add(_hashable(obj["id"]))
            state.good_bytes = offset
        state.torn_bytes = offset - state.good_bytes
        state.torn_lines = bad_lines
    return state


def _parse(line: bytes) -> Any:
    """A parsed output line, or None when it is not one (torn, garbage, not ours)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or "id" not in obj or "output_ids" not in obj:
        return None
    return obj


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int)) else json.dumps(value, sort_keys=True)


def repair_output(path: Path, state: OutputState) -> None:
    """Cut a torn tail off the output file (found by :func:`scan_output`), durably."""
    if not state.torn_bytes:
        return
    log.warning(
        "%s: removed %d torn line(s) (%d bytes) left by an interrupted run; those prompts run again",
        path, state.torn_lines, state.torn_bytes,
    )
    with open(path, "r+b") as f:
        f.truncate(state.good_bytes)
        f.flush()
        os.fsync(f.fileno())


def check_writable(path: Path) -> None:
    """Make sure the output folder exists and the file can be appended to, changing no content."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not path.is_file():
                raise ConfigError(f"output.path: {path} is not a file")
            with open(path, "ab"):
                pass
        else:
            # Probe with a scratch file, so a run that fails later leaves no empty output behind.
            probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
            with open(probe, "wb"):
                pass
            probe.unlink()
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"output.path: cannot write to {path} ({exc.strerror or exc})") from exc


class OutputLock:
    """An exclusive ``flock`` on the output file for the length of a run.

    Two runs appending to one output would both generate the prompts neither had finished, and
    ids would appear twice. The lock is held on the output file itself, so it needs no extra
    file, and the kernel drops it when the process ends, however it ends (``kill -9`` too).
    The file is created empty if missing, and removed again on release if it is still empty, so
    a run that fails before its first block leaves nothing behind.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): run unlocked
            fcntl = None
        self._created = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"output.path: cannot write to {self.path} ({exc.strerror or exc})") from exc
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise ConfigError(
                f"output.path: another flexgen predict is writing {self.path}; wait for it to finish "
                "or choose another output.path"
            ) from exc
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        try:
            if self._created and os.fstat(self._fd).st_size == 0:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None


def encode_lines(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each block's lines to the output file as soon as the block is done."""

    def __init__(self, path: str | Path):
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._fd: int | None = None
        self.lines_written = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"output.path: cannot write to {self.path} ({exc.strerror or exc})") from exc

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        data = memoryview(encode_lines(prediction))
        while data:  # one write in practice; loop in case the OS writes less
            written = os.write(self._fd, data)
            data = data[written:]
        os.fsync(self._fd)
        self.lines_written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
