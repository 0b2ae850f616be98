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
  so it is an error naming the line. Nor is a file with no output line at all (unless it is
  empty, or the start of our own first write beside our job file), a symbolic link, or a
  part file of that kind: a user's file given as ``output.path`` by mistake is refused and
  left byte for byte as it was, never appended to, cut or deleted.
* A block that cannot be written (a full disk) is cut back off, so the file stays as it was
  before that block, and the error is one line.
* Every line carries the fingerprint of the job that wrote it (see :mod:`flexgen.predict.job`);
  the run checks, before it appends, that the lines already there are this job's.

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
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from flexgen.errors import ConfigError
from flexgen.predict.job import Job, check_resume, job_path, prompt_key, read_job_file, write_job_file

log = logging.getLogger(__name__)


@dataclass
class OutputState:
    """What an existing output file holds."""

    done_ids: set = field(default_factory=set)
    good_bytes: int = 0  # length of the valid prefix
    torn_bytes: int = 0  # bytes after it (a torn tail), 0 when the file is clean
    torn_lines: int = 0
    #: id -> (line number, :func:`~flexgen.predict.job.prompt_key` of the prompt it was generated for)
    records: dict = field(default_factory=dict)
    #: job fingerprint (None: a line without one) -> the first line that carries it
    jobs: dict = field(default_factory=dict)

    @property
    def lines(self) -> int:
        return len(self.records)


#: how every line :func:`encode_lines` writes begins: a torn first write of ours starts so too
_LINE_START = b'{"id": '


def scan_output(path: Path, first_write_ok: bool = False) -> OutputState:
    """Read an output file line by line without changing it; a missing file is an empty one.

    The file must be recognisably this project's output, or ConfigError: a regular file (not
    a symbolic link) whose every complete line is an output record, with at most a torn tail
    (no final newline, or garbage such as NUL bytes a crash can leave) after the last record.
    A file holding no record at all is accepted only when empty, or when ``first_write_ok``
    (the run's job file exists, so a flexgen run was writing it) and its bytes begin as an
    output line does: an interrupted first write. Anything else is a file of the user's, which
    flexgen must neither append to nor cut.
    """
    state = OutputState()
    if path.is_symlink():
        raise ConfigError(f"output.path: {path} is a symbolic link; flexgen writes only to a regular file it made. "
                          "Give the real path, or choose another output.path")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return state
    except OSError as exc:
        raise ConfigError(f"output.path: cannot read {path} ({exc.strerror or exc})") from exc
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"output.path: {path} is not a regular file")
        offset = 0
        first_bad: int | None = None  # line number of the first bad line after the last good one
        bad_lines = 0
        head = b""
        for number, line in enumerate(f, start=1):
            if number == 1:
                head = line[: len(_LINE_START)]
            offset += len(line)
            obj = _parse(line) if line.endswith(b"\n") else None  # no newline: torn
            if obj is None:
                first_bad = first_bad or number
                bad_lines += 1
                continue
            if first_bad is not None:
                # A bad line followed by a good one is not crash damage: not our file to fix.
                raise _not_ours(path, f"line {first_bad} is not a flexgen output line")
            key = _hashable(obj["id"])
            state.done_ids.add(key)
            state.records[key] = (number, prompt_key(obj["input_ids"], obj.get("prompt")))
            state.jobs.setdefault(obj.get("job"), number)
            state.good_bytes = offset
        state.torn_bytes = offset - state.good_bytes
        state.torn_lines = bad_lines
    if state.torn_bytes and not state.records and not (first_write_ok and head == _LINE_START[: len(head)] and head):
        raise _not_ours(path, "line 1 is not a flexgen output line")
    return state


def _not_ours(path: Path, what: str) -> ConfigError:
    return ConfigError(f"output.path: {path} {what}; flexgen changes only its own output files. Move it away or "
                       "choose another output.path")


def _parse(line: bytes) -> Any:
    """A parsed output line, or None when it is not one (torn, garbage, not ours)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or not all(k in obj for k in ("id", "input_ids", "output_ids")):
        return None
    if isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)):
        return None
    if not _token_list(obj["input_ids"]) or not _token_list(obj["output_ids"]):
        return None
    return obj


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


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


def append_durably(fd: int, data: bytes, path: Path | str = "the output") -> None:
    """Append ``data`` with as few writes as the OS allows (one in practice), then fsync.

    When the write fails (a full disk, a file size limit), the file is cut back to its length
    before this call, so it never keeps half a block, and the failure is one ConfigError line.
    """
    size = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            pass  # the torn tail is cut by the next run
        raise ConfigError(f"output.path: cannot write to {path} ({exc.strerror or exc}); the lines already "
                          "there are kept, rerun to resume") from exc


def merge_parts(path: Path, parts: list[Path], done: set | None = None) -> int:
    """Append the lines of ``parts`` whose ids ``path`` lacks to ``path``; delete the parts.

    The caller holds the lock on ``path``, has repaired its torn tail and has checked that the
    parts hold this job's lines. ``done`` is the set of ids ``path`` holds, when the caller has
    just scanned it (the merged ids are added to it); otherwise ``path`` is scanned here. Each
    part is locked while it is merged, so a process still writing one (a rank of a run that lost
    its rank 0) makes this a ConfigError instead of a race. Returns the number of lines appended.
    """
    if not parts:
        return 0
    first_write_ok = job_path(path).exists()
    if done is None:
        done = scan_output(path, first_write_ok).done_ids
    appended = 0
    fd = _open_append(path)
    try:
        for part in parts:
            with OutputLock(part):
                state = scan_output(part, first_write_ok)
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
                    append_durably(fd, b"".join(new), path)
                appended += len(new)
                part.unlink()  # only once its lines are durably in the output
    finally:
        os.close(fd)
    return appended


@dataclass
class OutputCheck:
    """What :func:`check_output` found: the output's state, its part files', and notes to log."""

    state: OutputState
    parts: list[tuple[Path, OutputState]]
    notes: list[str]


def check_output(path: Path, job: Job, prompts: list[Any], restart: bool = False) -> OutputCheck:
    """Read, never change, the output and the part files an interrupted run left beside it.

    Each must be recognisably this project's (:func:`scan_output`) and, unless ``restart``, made
    by this job for these prompts (:func:`~flexgen.predict.job.check_resume`); otherwise
    ConfigError, one line naming the file.
    """
    first_write_ok = read_job_file(path) is not None
    state = scan_output(path, first_write_ok)
    parts = [(part, scan_output(part, first_write_ok)) for part in leftover_parts(path)]
    notes: list[str] = []
    if not restart:
        notes += check_resume(path, state, job, prompts)
        for part, part_state in parts:
            notes += check_resume(path, part_state, job, prompts, where=part)
    return OutputCheck(state, parts, notes)


def prepare_output(path: Path, job: Job, prompts: list[Any], restart: bool = False) -> set:
    """Rank 0, holding the lock on ``path``: check, repair and merge what is there; the ids done.

    Nothing is changed unless :func:`check_output` passes. Then the torn tail is cut, the parts
    merged and the job file written, in that order. With ``restart`` the output is emptied and
    the parts are deleted instead. One scan of the output: cutting the torn tail removes no
    done id, and the merge adds the ids it appends to the same set.
    """
    found = check_output(path, job, prompts, restart)
    state, part_states = found.state, found.parts
    parts = [part for part, _ in part_states]
    if restart:
        discarded = state.lines + sum(s.lines for _, s in part_states)
        with open(path, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())
        for part in parts:
            with OutputLock(part):
                part.unlink()
        write_job_file(path, job)
        log.info("--restart: discarded %d line(s) of %s%s; generating every prompt again", discarded, path,
                 f" and {len(parts)} part file(s)" if parts else "")
        return set()
    for note in found.notes:
        log.warning("%s", note)
    repair_output(path, state)
    recorded = read_job_file(path)
    if recorded is None or recorded.get("fingerprint") != job.fingerprint:
        write_job_file(path, job)  # before the first line is appended
    if parts:
        count = merge_parts(path, parts, state.done_ids)
        log.info("merged %d line(s) from %d part file(s) of an interrupted run into %s", count, len(parts), path)
    return state.done_ids


def reorder_output(path: Path, prompts: list[Any]) -> bool:
    """Rewrite a finished output in the prompts' order (``output.order: prompts``); whether it changed.

    The caller holds the lock on ``path`` and every prompt has its line. Lines whose ids are not
    among the prompts (prompts removed from the file) keep their order, after the others. The
    new file is written beside the old one, fsync-ed and renamed over it, so a crash leaves
    either order, never a mix; it keeps the old file's permissions.
    """
    state = scan_output(path)
    if state.torn_bytes:
        return False  # not a finished output; the next run repairs it first
    lines = good_lines(path, state)
    position = {p.id: i for i, p in enumerate(prompts)}
    keyed = sorted((position.get(_hashable(json.loads(line)["id"]), len(position)), n, line)
                   for n, line in enumerate(lines))
    ordered = [line for _, _, line in keyed]
    if ordered == lines:
        return False
    tmp = path.with_name(f".{path.name}.reorder-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            append_durably(fd, b"".join(ordered), path)
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"output.path: cannot rewrite {path} in prompt order ({exc.strerror or exc}); its lines "
                          "are kept in block order") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: Path) -> None:
    """Make sure the output folder exists and the file can be appended to, changing no content."""
    if path.is_symlink():
        raise ConfigError(f"output.path: {path} is a symbolic link; flexgen writes only to a regular file it made. "
                          "Give the real path, or choose another output.path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not path.is_file():
                raise ConfigError(f"output.path: {path} is not a file")
            with open(path, "ab"):
                pass
        else:
            # Probe with a scratch file, so a run that fails later leaves no empty output behind.
            probe = path.with_name(f".{path.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"output.path: cannot write to {path} ({exc.strerror or exc})") from exc


def _open_append(path: Path) -> int:
    """An append-only fd on ``path`` (created if missing), never through a symbolic link."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
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
        self._fd = _open_append(self.path)
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


def encode_lines(lines: list[dict[str, Any]], job: str | None = None) -> bytes:
    """The bytes of output lines, each stamped with the fingerprint of the job that made it."""
    if job is not None:
        lines = [{**line, "job": job} for line in lines]
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each block's lines to its file as soon as the block is done.

    ``path`` is the output on rank 0 and the rank's part file on the others, and ``job`` the
    run's job fingerprint (both set by the run before the loop starts, see :func:`part_path`).
    """

    def __init__(self, path: str | Path, job: str | None = None):
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.job = job
        self._fd: int | None = None
        self.lines_written = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        self._fd = _open_append(self.path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        if not prediction:  # an empty block pads a rank's share (see PromptDataModule.shard)
            return
        append_durably(self._fd, encode_lines(prediction, self.job), self.path)
        self.lines_written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
