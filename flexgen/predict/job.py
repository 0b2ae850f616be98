"""What made an output, so that a resume is the same job or is refused.

A predict run appends to its output file, and a rerun skips the prompts already there. That is
only right when the lines already there are what this run would write. So every output line
carries the *job fingerprint* of the run that wrote it (``"job"``), text prompts their text
(``"prompt"``) beside their token ids (``"input_ids"``), and the settings behind the fingerprint
are kept next to the output in ``<output.path>.job.json``, so that a refusal can say what
differs. A rerun is refused, with one line naming the setting, when:

* the lines were made with other settings that change tokens (:func:`job_settings`): the
  model's weights (a checkpoint's :meth:`~flexgen.models.checkpoint.HFCheckpoint.content_fingerprint`,
  or a synthetic size and seed), ``model.dtype``, the generation settings (for greedy runs only
  ``max_new_tokens``, ``stop`` and ``repetition_penalty``: temperature, top-k, top-p and seed
  do not change greedy tokens),
  the weight and cache compressors, and an attention plugin other than the exact built-ins;
* a prompt's text or token ids changed under the same id;
* a line has no fingerprint (an older flexgen's output): it cannot be checked.

What may change between runs, because it does not change greedy tokens: the policy (placement,
batch geometry, overlap, pinning), the built-in ``gpu``/``cpu`` attention, the storage
backends, the scheduler, the compute device and the number of processes. (In float16 and
bfloat16 another placement or batch size can round differently; that is the same rounding an
uninterrupted run with that policy would have, not a change of job.) Prompts added to the
file are generated; prompts removed from it are reported, and their lines kept.

Starting afresh is explicit: another ``output.path``, or ``flexgen predict --restart``, which
empties the output (only ever a file recognisably this project's output) and starts again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen.errors import ConfigError

#: built-in attention backends that compute attention exactly (the same greedy tokens)
EXACT_ATTENTION = ("gpu", "cpu")

_MARK = "flexgen-job"
_RESTART_HINT = "start afresh with another output.path or with --restart (which discards its lines)"


@dataclass(frozen=True)
class Job:
    """The settings that decide an output's tokens, and their fingerprint."""

    settings: dict[str, Any]
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        text = json.dumps(self.settings, sort_keys=True, default=str)
        object.__setattr__(self, "fingerprint", hashlib.sha256(text.encode()).hexdigest()[:16])


def plugin_value(spec: Any) -> Any:
    """A plugin spec in one canonical form: its name, or ``{name, **options}`` when it has options."""
    from flexgen.registry import parse_spec

    name, options = parse_spec(spec, "plugins")
    return {"name": name, **options} if options else name


def job_settings(model: str, dtype: str, generation: Mapping[str, Any], plugins: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a job fingerprint covers, keyed by config key. ``model`` names the weights."""
    stop = generation.get("stop")
    stops = sorted(stop if isinstance(stop, list) else [] if stop is None else [stop])
    settings: dict[str, Any] = {
        "model.weights": model,
        "model.dtype": dtype,
        "generation.max_new_tokens": generation["max_new_tokens"],
        "generation.stop": stops,
        "generation.do_sample": bool(generation["do_sample"]),
    }
    # Settings added later are recorded only when they are not their "off" value, so that the
    # jobs of earlier versions, which could not set them, keep their fingerprint.
    strings = generation.get("stop_strings") or []
    if strings:
        settings["generation.stop_strings"] = sorted([strings] if isinstance(strings, str) else strings)
    if float(generation.get("repetition_penalty", 1.0)) != 1.0:
        settings["generation.repetition_penalty"] = float(generation["repetition_penalty"])
    if generation["do_sample"]:
        settings["generation.temperature"] = float(generation["temperature"])
        settings["generation.top_p"] = float(generation["top_p"])
        settings["generation.seed"] = generation["seed"]
        if generation.get("top_k"):
            settings["generation.top_k"] = int(generation["top_k"])
        if float(generation["top_p"]) < 1:
            # top-p is now HF's TopPLogitsWarper, whose cut can differ from the earlier rule's at
            # a tie; a sampled job of an earlier version is not resumed with it.
            settings["generation.top_p_rule"] = "transformers"
    for key in ("weight_compressor", "cache_compressor"):
        settings[f"plugins.{key}"] = plugin_value(plugins[key])
    attention = plugin_value(plugins["attention"])
    settings["plugins.attention"] = "exact" if attention in EXACT_ATTENTION else attention
    return settings


def job_path(out_path: Path) -> Path:
    """``<output.path>.job.json``: the settings of the job whose lines the output holds."""
    return out_path.with_name(f"{out_path.name}.job.json")


def read_job_file(out_path: Path) -> dict[str, Any] | None:
    """The job file's content when it is one of ours, None when there is none."""
    path = job_path(out_path)
    if not path.exists() and not path.is_symlink():
        return None
    check_own_json(path, lambda obj: obj.get(_MARK) == 1, "a flexgen job file")
    return json.loads(path.read_text(encoding="utf-8"))


def write_job_file(out_path: Path, job: Job) -> None:
    from flexgen.atomic import write_json_atomic

    write_json_atomic(job_path(out_path), {_MARK: 1, "fingerprint": job.fingerprint, "settings": job.settings})


def check_own_json(path: Path, is_ours, what: str) -> None:
    """Refuse to replace ``path`` unless it is a regular JSON file this project wrote (``is_ours(obj)``)."""
    if path.is_symlink():
        raise ConfigError(f"output.path: {path} is a symbolic link; flexgen replaces only {what} it wrote itself. "
                          "Move it away or choose another output.path")
    if not path.exists():
        return
    try:
        obj = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        obj = None
    if not isinstance(obj, dict) or not is_ours(obj):
        raise ConfigError(f"output.path: {path} is not {what}, and flexgen would replace it. Move it away or "
                          "choose another output.path")


def prompt_key(input_ids: Sequence[int], text: str | None) -> tuple[int, int]:
    """What identifies a prompt's content within one process: its token ids and its text."""
    return hash(tuple(input_ids)), hash(text)


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``generation.max_new_tokens was 16, this run has 32`` (and how many more differ)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    if not keys:
        return "its job fingerprint differs"
    first = keys[0]
    if first == "model.weights":
        text = f"other model weights ({old.get(first)}; this run: {new.get(first)})"
    else:
        text = f"{first}={_show(old.get(first))} (this run: {_show(new.get(first))})"
    more = f", and {len(keys) - 1} more setting(s) differ ({', '.join(keys[1:])})" if len(keys) > 1 else ""
    return text + more


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value) if not isinstance(value, str) else value


def check_resume(out_path: Path, state: Any, job: Job, prompts: Sequence[Any], where: Path | None = None) -> list[str]:
    """Refuse (ConfigError) an output whose lines another job made; return notes to log.

    ``state`` is the :class:`~flexgen.predict.writer.OutputState` of ``where`` (the output itself,
    or one of its part files), ``prompts`` this run's :class:`~flexgen.predict.data.Prompt` list.
    """
    where = where or out_path
    if not state.jobs:
        return []
    if None in state.jobs:
        raise ConfigError(
            f"output.path: {where} line {state.jobs[None]} carries no job fingerprint (written by an older flexgen), "
            f"so resuming it cannot be checked; {_RESTART_HINT}"
        )
    if len(state.jobs) > 1:
        (first, line1), (_, line2) = sorted(state.jobs.items(), key=lambda item: item[1])[:2]
        raise ConfigError(f"output.path: {where} mixes the lines of two jobs (line {line1} and line {line2}); {_RESTART_HINT}")
    (made_by,) = state.jobs
    if made_by != job.fingerprint:
        recorded = read_job_file(out_path)
        if recorded is not None and recorded.get("fingerprint") == made_by:
            what = describe_difference(recorded.get("settings") or {}, job.settings)
        else:
            what = f"another job (fingerprint {made_by}; this run's is {job.fingerprint})"
        raise ConfigError(f"output.path: {where} was generated with {what}; rerun with the same settings to "
                          f"resume it, or {_RESTART_HINT}")
    by_id = {p.id: p for p in prompts}
    for pid, (line, recorded_key) in state.records.items():
        prompt = by_id.get(pid)
        if prompt is None:
            continue
        ids_key, text_key = prompt_key(prompt.input_ids, prompt.text)
        if recorded_key != (ids_key, text_key):
            what = "token ids" if recorded_key[0] != ids_key else "text"
            raise ConfigError(
                f"output.path: prompt {pid!r} ({prompt.source}) is not the prompt {where} line {line} was generated "
                f"for (its {what} changed); give it a new id, or {_RESTART_HINT}"
            )
    removed = [pid for pid in state.records if pid not in by_id]
    if removed:
        return [f"{where}: {len(removed)} line(s) have ids that are not among the prompts (e.g. {removed[0]!r}); "
                "they are kept as they are"]
    return []
