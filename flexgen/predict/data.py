"""Prompts: reading them, checking them, and cutting them into blocks for the engine.

Prompt files:

* ``.jsonl`` (or ``.json`` with one object per line): ``{"id": ..., "text": "..."}`` or
  ``{"id": ..., "input_ids": [...]}``. ``input_ids`` win when both are given. Without ``"id"``,
  the prompt's id is its line number (from 1). Ids are strings or integers, unique per file.
  Blank lines are skipped.
* ``.txt``: one text prompt per non-blank line; the id is the line number (from 1).
* tables, read with the ``datasets`` library (``pip install 'flexgen[datasets]'``): a ``.csv``,
  ``.tsv``, ``.parquet`` or ``.arrow`` file (``datasets.load_dataset``), or a folder written by
  ``Dataset.save_to_disk`` (``datasets.load_from_disk``; of a ``DatasetDict``, the split
  ``data.split`` names, or its only one). A row is a prompt: its text in the ``data.text_field``
  column (default ``text``), or its token ids in an ``input_ids`` column (which wins); its id in
  the ``data.id_field`` column (default ``id``), or, without such a column, its row index
  (from 0). The table is read into memory (prompts are held in memory anyway) through a
  temporary cache, so no converted copy of it is left in the Hugging Face cache.
* no file: ``data.num_prompts`` synthetic prompts of ``data.prompt_len`` random token ids
  (seeded), with ids 0, 1, ...
* from Python (:func:`prompts_from_list`, used by :func:`flexgen.batch_generate`): strings or
  token-id lists, their index in the list as id.

``data.text_field`` and ``data.id_field`` name the keys of ``.jsonl`` objects as well.

Text is tokenised with the model's tokenizer exactly as ``tokenizer(text)["input_ids"]`` does
(OPT's prepends ``</s>``). Every problem is a :class:`~flexgen.errors.PromptError` naming the
file and line, found before the engine is loaded.

Blocks: prompts are sorted by token length (stably, so ties keep file order) and cut into blocks
of ``policy.block_size`` (``num_gpu_batches x gpu_batch_size``). Similar lengths in one block
means little padding. Blocks are cut over *all* prompts, and only then are prompts already in
the output dropped, so a resumed run gives the remaining prompts the same block-mates they had
in the first run. (Sampled outputs do not depend on block-mates at all: each prompt samples
from its own random stream, keyed by its id and tokens; see :mod:`flexgen.predict.module`.)

Several processes: every rank cuts the same blocks from the same prompts and the same done set
(rank 0's, broadcast), then takes every ``world_size``-th block starting at its rank
(:meth:`PromptDataModule.shard`). Round-robin keeps the shares balanced, since neighbouring
blocks have similar lengths. Shares are padded with *empty* blocks to one length (at least one
step), so no block is ever run twice (Lightning's DistributedSampler would pad by repeating
blocks) and every rank reaches the end-of-run collectives.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from flexgen.errors import ConfigError, PromptError

PromptId = Any  # str | int


@dataclass(frozen=True)
class Prompt:
    """One prompt: its id, its token ids, where it came from (for error messages), its text if any."""

    id: PromptId
    input_ids: tuple[int, ...]
    source: str  # "prompts.jsonl line 3" or "synthetic prompt 0"
    text: Optional[str] = None  # the text it was tokenised from (None: given as token ids)


# --------------------------------------------------------------------------- reading


#: file suffix -> the ``datasets`` builder that reads it
TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_FORMATS = (".jsonl", ".json", ".txt")

#: a prompt before tokenisation: (where it is, for messages; its id; its text or None; its token ids or None)
Row = tuple[str, Any, Optional[str], Optional[list]]


def read_prompts(path: str | Path, tokenizer: Any = None, text_field: str = "text", id_field: str = "id",
                 split: str | None = None) -> list[Prompt]:
    """Read a prompt file or saved dataset (see the module docstring); token ids are checked later by
    :func:`check_prompts`."""
    path = Path(path)
    if path.is_dir():
        return _tokenize(path, _read_table(path, None, text_field, id_field, split), tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.prompts: file {path} not found")
    suffix = path.suffix.lower()
    if suffix in TABLE_FORMATS:
        return _tokenize(path, _read_table(path, TABLE_FORMATS[suffix], text_field, id_field, split), tokenizer)
    if suffix not in TEXT_FORMATS:
        raise ConfigError(f"data.prompts: {path} must be a .jsonl, .txt, .csv, .tsv, .parquet or .arrow file, "
                          "or a folder written by datasets' save_to_disk")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"data.prompts: cannot read {path} ({exc.strerror or exc})") from exc
    rows = _read_txt(path, raw) if suffix == ".txt" else _read_jsonl(path, raw, text_field, id_field)
    return _tokenize(path, rows, tokenizer)


def prompts_from_list(items: Sequence[Any], tokenizer: Any = None) -> list[Prompt]:
    """Prompts given in Python: strings (tokenised) or lists of token ids; each one's index is its id."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise PromptError("prompts must be a list of strings or of token-id lists, e.g. ['The policy says', ...]")
    rows: list[Row] = []
    for i, item in enumerate(items):
        where = f"prompts[{i}]"
        if isinstance(item, str):
            if not item:
                raise PromptError(f"{where}: an empty string")
            _check_encodable(where, "text", item)
            rows.append((where, i, item, None))
        elif _is_token_list(item):
            rows.append((where, i, None, [int(t) for t in item]))
        else:
            raise PromptError(f"{where}: expected a string or a non-empty list of token ids, got {type(item).__name__}")
    return _tokenize("prompts", rows, tokenizer)


def _is_token_list(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _read_table(path: Path, builder: str | None, text_field: str, id_field: str, split: str | None) -> list[Row]:
    """The rows of a table file (``builder``) or a saved dataset (``builder`` None), through ``datasets``."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"data.prompts: reading {path.name} needs the datasets library; "
                          "pip install 'flexgen[datasets]'") from exc
    import tempfile

    progress_was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if builder is None:
            table = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:
            options = {"sep": "	"} if path.suffix.lower() == ".tsv" else {}
            with tempfile.TemporaryDirectory(prefix="flexgen-prompts-") as cache:
                table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                              keep_in_memory=True, **options)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.prompts: {path} is not a dataset folder written by save_to_disk ({_first_line(exc)})") from exc
    except Exception as exc:  # datasets and pyarrow raise many kinds for a malformed file
        raise ConfigError(f"data.prompts: cannot read {path} as {builder or 'a saved dataset'} ({_first_line(exc)})") from exc
    finally:
        if progress_was_on:
            datasets.enable_progress_bars()
    if isinstance(table, datasets.DatasetDict):
        names = list(table)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in table:
            raise ConfigError(f"data.split: {path} holds the splits {', '.join(names)}; "
                              f"{'set data.split to one of them' if split is None else f'not {split!r}'}")
        table = table[split]
    columns = list(table.column_names)
    has_ids = "input_ids" in columns
    if text_field not in columns and not has_ids:
        raise ConfigError(f"data.text_field: {path} has no column {text_field!r} (nor input_ids); its columns: "
                          f"{', '.join(columns)}")
    if id_field not in columns and id_field != "id":
        raise ConfigError(f"data.id_field: {path} has no column {id_field!r}; its columns: {', '.join(columns)}")
    rows: list[Row] = []
    seen: dict[PromptId, int] = {}
    for index, record in enumerate(table):
        where = f"{path} row {index}"
        pid = record[id_field] if id_field in columns else index
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise PromptError(f"{where}: {id_field!r} must be a string or an integer, got {pid!r}")
        _check_encodable(where, id_field, pid)
        if pid in seen:
            raise PromptError(f"{where}: duplicate id {pid!r} (first in row {seen[pid]})")
        seen[pid] = index
        ids = record.get("input_ids") if has_ids else None
        if ids is not None:
            if not _is_token_list(ids):
                raise PromptError(f"{where}: 'input_ids' must be a non-empty list of integers")
            rows.append((where, pid, None, list(ids)))
            continue
        text = record.get(text_field)
        if not isinstance(text, str) or not text:
            raise PromptError(f"{where}: {text_field!r} must be a non-empty string, got {text!r}")
        _check_encodable(where, text_field, text)
        rows.append((where, pid, text, None))
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lines(path: Path, raw: bytes) -> Iterable[tuple[int, str]]:
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as some editors write: not part of line 1
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PromptError(f"{path} line {number}: not valid UTF-8 ({exc.reason})") from exc
        if text.strip():
            yield number, text


def _read_txt(path: Path, raw: bytes) -> list[Row]:
    return [(f"{path} line {number}", number, text, None) for number, text in _lines(path, raw)]


def _read_jsonl(path: Path, raw: bytes, text_field: str = "text", id_field: str = "id") -> list[Row]:
    rows = []
    seen: dict[PromptId, int] = {}
    for number, text in _lines(path, raw):
        where = f"{path} line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise PromptError(f"{where}: expected a JSON object with 'text' or 'input_ids', got {type(obj).__name__}")
        pid = obj.get(id_field, number)
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise PromptError(f"{where}: {id_field!r} must be a string or an integer, got {pid!r}")
        _check_encodable(where, id_field, pid)
        if pid in seen:
            raise PromptError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = number
        ids, prompt_text = obj.get("input_ids"), obj.get(text_field)
        if ids is not None:
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise PromptError(f"{where}: 'input_ids' must be a non-empty list of integers")
            rows.append((where, pid, None, ids))
        elif prompt_text is not None:
            if not isinstance(prompt_text, str) or not prompt_text:
                raise PromptError(f"{where}: {text_field!r} must be a non-empty string")
            _check_encodable(where, text_field, prompt_text)
            rows.append((where, pid, prompt_text, None))
        else:
            raise PromptError(f"{where}: a prompt needs {text_field!r} or 'input_ids'")
    return rows


def _check_encodable(where: str, key: str, value: Any) -> None:
    """Refuse now what could not be written to the output as UTF-8 JSON after generation (a lone surrogate)."""
    if not isinstance(value, str):
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ascii(value[exc.start:exc.end])  # the escape as written, printable anywhere
        raise PromptError(f"{where}: {key!r} holds {bad}, which is not valid Unicode (a lone surrogate "
                          "escape) and cannot be written as UTF-8") from exc


def _tokenize(path: Path | str, rows: list[Row], tokenizer: Any) -> list[Prompt]:
    prompts = []
    for where, pid, text, ids in rows:
        if ids is None:
            if tokenizer is None:
                raise PromptError(
                    f"{where}: a text prompt needs a tokenizer; set model.tokenizer, or give input_ids instead"
                )
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                raise PromptError(f"{where}: the text tokenises to no tokens")
        prompts.append(Prompt(pid, tuple(int(t) for t in ids), where, text))
    if not prompts:
        raise PromptError(f"{path}: no prompts in the file" if isinstance(path, Path) else f"{path}: the list is empty")
    return prompts


def synthetic_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[Prompt]:
    """Seeded random prompts (benchmarks); ids 0..num_prompts-1; ids avoid OPT's special tokens 0-3."""
    rng = random.Random(seed)
    low = 4 if vocab_size > 4 else 0
    return [
        Prompt(i, tuple(rng.randrange(low, vocab_size) for _ in range(prompt_len)), f"synthetic prompt {i}")
        for i in range(num_prompts)
    ]


def check_prompts(prompts: Sequence[Prompt], vocab_size: int, max_positions: int, max_new_tokens: int) -> None:
    """Token ids inside the vocabulary, and prompt + new tokens within the model's positions.

    As in HF transformers, prompt + new tokens may reach ``max_positions + 1``: the last new
    token is never fed back, so it needs no position.
    """
    for p in prompts:
        bad = next((t for t in p.input_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise PromptError(f"{p.source}: token id {bad} is outside the model's vocabulary (0..{vocab_size - 1})")
        if len(p.input_ids) + max_new_tokens > max_positions + 1:
            raise PromptError(
                f"{p.source}: {len(p.input_ids)} prompt tokens + generation.max_new_tokens {max_new_tokens} "
                f"exceed the model's {max_positions} positions (+1 for the last new token)"
            )


def load_prompts(cfg: Any, tokenizer: Any, spec: Any, given: Sequence[Any] | None = None) -> list[Prompt]:
    """The prompts a config's ``data.*`` names (or ``given`` from Python), checked against the model (its family's spec)."""
    d = cfg.data
    if given is not None:
        prompts = prompts_from_list(given, tokenizer)
    elif d.prompts is not None:
        prompts = read_prompts(os.path.expanduser(d.prompts), tokenizer, d.text_field, d.id_field, d.split)
    else:
        prompts = synthetic_prompts(d.num_prompts, d.prompt_len, spec.vocab_size, d.seed)
    check_prompts(prompts, spec.vocab_size, spec.max_positions, cfg.generation.max_new_tokens)
    return prompts


# --------------------------------------------------------------------------- blocks


def make_blocks(prompts: Sequence[Prompt], block_size: int) -> list[list[Prompt]]:
    """Sort by length (stable) and cut into blocks of ``block_size``; the last may be short."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    ordered = sorted(prompts, key=lambda p: len(p.input_ids))
    return [ordered[i : i + block_size] for i in range(0, len(ordered), block_size)]


def block_batch(index: int, block: Sequence[Prompt]) -> dict[str, Any]:
    """What ``predict_step`` receives: plain lists, so Lightning has no tensor to move."""
    return {"block": index, "ids": [p.id for p in block], "input_ids": [list(p.input_ids) for p in block],
            "texts": [p.text for p in block]}


def _as_is(item: Any) -> Any:
    return item


#: what a rank runs when its share is shorter than the longest one: no prompts, nothing written
EMPTY_BLOCK: dict[str, Any] = {"block": -1, "ids": [], "input_ids": [], "texts": []}


class PromptDataModule(L.LightningDataModule):
    """Serves one block of prompts per predict step, skipping prompts already done.

    ``block`` in each batch is the block's index over all prompts (not over the remaining ones),
    so it stays the same when a run is resumed.
    Attached to a Trainer, each process serves its own share (:meth:`shard`) of the blocks.
    """

    def __init__(self, prompts: Sequence[Prompt], block_size: int, done_ids: Iterable[PromptId] = ()):
        super().__init__()
        self.prompts = list(prompts)
        self.block_size = block_size
        self.resume(done_ids)

    def resume(self, done_ids: Iterable[PromptId], block_size: int | None = None) -> None:
        """Recompute the blocks to run from the ids already done (and, optionally, a block size)."""
        if block_size is not None:
            self.block_size = block_size
        self.done_ids = set(done_ids)
        self.batches: list[dict[str, Any]] = []
        for index, block in enumerate(make_blocks(self.prompts, self.block_size)):
            todo = [p for p in block if p.id not in self.done_ids]
            if todo:
                self.batches.append(block_batch(index, todo))

    @property
    def num_todo(self) -> int:
        return sum(len(b["ids"]) for b in self.batches)

    @property
    def num_skipped(self) -> int:
        return len(self.prompts) - self.num_todo

    def shard(self, rank: int, world_size: int) -> list[dict[str, Any]]:
        """Rank ``rank``'s blocks: every ``world_size``-th from ``rank``, padded with empty blocks.

        Every rank gets the same number of steps, at least one, so that no rank skips the loop
        (Lightning skips an empty one, and the run's end-of-loop collectives would then hang).
        """
        mine = self.batches[rank::world_size]
        steps = max(1, math.ceil(len(self.batches) / world_size))
        return mine + [dict(EMPTY_BLOCK) for _ in range(steps - len(mine))]

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # The list of blocks is the (map-style) dataset; batch_size=None: each item is already a whole block.
        return DataLoader(self.shard(rank, world_size), batch_size=None, shuffle=False, collate_fn=_as_is, num_workers=0)
