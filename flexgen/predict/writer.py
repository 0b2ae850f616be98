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

With several processes (``trainer.devices=N``, see docs/distributed.md) rank 0 appends to the
output itself and rank *k* > 0 to its own *part file* ``<output>.rank<k>``, under its own lock,
so no two processes ever append to one file. When all ranks are done, rank 0 merges the part
files into the output (:func:`merge_parts`: append the lines whose ids are not there yet, fsync,
delete the part). A run that dies leaves part files behind; the next run merges them first, so
their prompts count as done whichever rank wrote them. The merge needs no rename to be safe: a
crash during the append leaves a torn tail (cut next time) and the part file still in place
(merged again, its ids already in the output skipped).
"""

from __future__ import annotations

import json
import logging
import os
import re
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


def part_path(path: Path, rank: int) -> Path:
    """The part file where rank ``rank`` (> 0) of a multi-process run appends: ``<output>.rank<k>``."""
    return path.with_name(f"{path.name}.rank{rank}")


def leftover_parts(path: Path) -> list[Path]:
    """The part files of ``path`` that exist (an unmerged earlier run's, or this run's), by rank."""
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)")
    try:
        found = [(int(m.group(1)), p) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except FileNotFoundError:
        return []
    return [p for _, p in sorted(found)]


def good_lines(path: Path, state: OutputState) -> list[bytes]:
    """The complete, valid lines of a file whose scan is ``state`` (its torn tail left out)."""
    with open(path, "rb") as f:
        return f.read(state.good_bytes).splitlines(keepends=True)


def append_durably(fd: int, data: bytes) -> None:
    """Append ``data`` with as few writes as the OS allows (one in practice), then fsync."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def merge_parts(path: Path, parts: list[Path], done: set | None = None) -> int:
    """Append the lines of ``parts`` whose ids ``path`` lacks to ``path``; delete the parts.

    The caller holds the lock on ``path`` and has repaired its torn tail. ``done`` is the set of
    ids ``path`` holds, when the caller has just scanned it (the merged ids are added to it);
    otherwise ``path`` is scanned here. Each part is locked while it is merged, so a process
    still writing one (a rank of a run that lost its rank 0) makes this a ConfigError instead of
    a race. Returns the number of lines appended.
    """
    if not parts:
        return 0
    if done is None:
        done = scan_output(path).done_ids
    appended = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for part in parts:
            with OutputLock(part):
                state = scan_output(part)
                if state.torn_bytes:
                    log.warning("%s: ignored %d torn line(s) left by an interrupted run; those prompts run again",
                                part, state.torn_lines)
                new = []
                for line in good_lines(part, state):
                    key = _hashable(json.loads(line)["id"])
                    if key not in done:
                        done.add(key)
                        new.append(line)
                if new:
                    append_durably(fd, b"".join(new))
                appended += len(new)
                part.unlink()  # only once its lines are durably in the output
    finally:
        os.close(fd)
    return appended


def prepare_output(path: Path) -> set:
    """Rank 0, holding the lock on ``path``: cut its torn tail, merge leftover parts; the ids done.

    One scan of the output: cutting the torn tail removes no done id, and the merge adds the ids
    it appends to the same set.
    """
    state = scan_output(path)
    repair_output(path, state)
    parts = leftover_parts(path)
    if parts:
        count = merge_parts(path, parts, state.done_ids)
        log.info("merged %d line(s) from %d part file(s) of an interrupted run into %s", count, len(parts), path)
    return state.done_ids


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
    """Appends each block's lines to its file as soon as the block is done.

    ``path`` is the output on rank 0 and the rank's part file on the others (set by the run
    before the loop starts, see :func:`part_path`).
    """

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
        if not prediction:  # an empty block pads a rank's share (see PromptDataModule.shard)
            return
        append_durably(self._fd, encode_lines(prediction))
        self.lines_written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
