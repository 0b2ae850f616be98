"""The schema of ``configs/*.yaml``, and how a config file plus command-line overrides become one
validated :class:`FlexGenConfig`.

The schema is a set of dataclasses read by omegaconf (its "structured configs"), so a config file
and its ``key=value`` overrides are checked against one definition: an unknown key, a value of the
wrong type, or a value out of range is a :class:`~flexgen.errors.ConfigError` whose one-line
message names the key (and, for an unknown key, the closest known one). omegaconf's own
exceptions never reach the user.

Decisions written down here because the rest of the code relies on them:

* **Layers.** Schema defaults, then the config file, then each command-line override, merged in
  that order; the last one to set a key wins.
* **Relative paths.** Input paths written *in a config file* (``model.path``, ``model.tokenizer``
  when such a path exists, else it is taken as a Hub name, ``data.prompts``) are relative to
  that file's folder, so a config and its prompts travel together. Output paths (``output.path``, ``output.offload_dir``) and every path given on the
  command line are relative to the current directory. ``~`` is expanded everywhere.
* **``policy: auto``.** ``policy`` is either a mapping of policy keys or the string ``auto``;
  ``auto`` is stored as ``policy.auto = true`` and means the cost model
  (:func:`flexgen.planner.optimizer.auto_policy`) chooses every policy key, and the attention backend and
  compressors it names replace those of ``plugins``. Setting ``policy.<key>`` as well is an
  error, since it would be silently ignored.
* **``builtin:quickstart``** as ``model.path`` names the small synthetic OPT checkpoint built
  locally by :mod:`flexgen.models.quickstart` (no download).
* **``hardware``** describes the machine to the cost model (``policy: auto``): a profile (preset
  name or YAML file; measured on this machine and cached when null) and optional capacity caps
  (``gpu_memory: 24GiB``). A GPU cap also limits the process's CUDA allocator, so one machine
  can really behave like a smaller GPU. ``hardware.profile`` written in a config file is relative
  to that file's folder when such a file exists (else it is taken as a preset name).
* **Several processes** (``trainer.devices``, ``trainer.num_nodes``, ``trainer.strategy: ddp``)
  are allowed: each process runs its own engine on a share of the blocks; see
  docs/distributed.md.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from flexgen.errors import ConfigError, FlexGenError
from flexgen.policy import Policy

DTYPES = ("auto", "float32", "float16", "bfloat16")
PLUGIN_KEYS = ("storage", "attention", "weight_compressor", "cache_compressor", "scheduler")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
HARDWARE_CAPS = ("gpu_memory", "cpu_memory", "disk_memory")
BUILTIN_PREFIX = "builtin:"
OUTPUT_ORDERS = ("blocks", "prompts")


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Which model to run. Exactly one of ``path`` and ``synthetic``."""

    path: Optional[str] = None  # HF checkpoint dir of a registered family, or builtin:quickstart
    synthetic: Optional[str] = None  # a size of any family (opt-125m, llama-3.1-8b, ...): seeded random weights
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (auto: see flexgen/dtypes.py)
    tokenizer: Optional[str] = None  # defaults to model.path; needed only for text prompts
    seed: int = 0  # seed of synthetic weights


@dataclass
class PolicyConfig:
    """Mirrors :class:`flexgen.policy.Policy`; ``auto`` is set by ``policy: auto``."""

    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    weights_gpu: float = 100
    weights_cpu: float = 0
    cache_gpu: float = 100
    cache_cpu: float = 0
    act_gpu: float = 100
    act_cpu: float = 0
    overlap: bool = True
    pin_weights: bool = True
    auto: bool = False


@dataclass
class PluginsConfig:
    """Each value: a registered plugin name, or a mapping ``{name: ..., <its options>}``."""

    storage: Any = field(default_factory=lambda: {"gpu": "gpu", "cpu": "cpu", "disk": "disk"})
    attention: Any = "gpu"
    weight_compressor: Any = "none"
    cache_compressor: Any = "none"
    scheduler: Any = "zigzag"


@dataclass
class DataConfig:
    """Prompts: a file, or ``num_prompts`` synthetic prompts of ``prompt_len`` tokens."""

    prompts: Optional[str] = None  # .jsonl, .txt, .csv, .tsv, .parquet, .arrow, or a save_to_disk folder
    num_prompts: Optional[int] = None
    prompt_len: Optional[int] = None
    seed: int = 0  # seed of synthetic prompts
    text_field: str = "text"  # the column (or .jsonl key) holding a prompt's text
    id_field: str = "id"  # the column (or .jsonl key) holding a prompt's id; without it, the row's number
    split: Optional[str] = None  # the split of a saved DatasetDict (its only one by default)


@dataclass
class GenerationConfig:
    """Arguments of ``Engine.generate``."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # with do_sample: keep the k most likely tokens; 0: off
    repetition_penalty: float = 1.0  # HF's (CTRL's) penalty on tokens already in the sequence; 1.0: off
    stop: Any = None  # None | a token id or a string | a list of token ids and strings
    seed: Optional[int] = 0  # with do_sample: each prompt's stream is drawn from (seed, its id, its tokens)


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer``; the engine's compute device follows ``accelerator``."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    enable_progress_bar: bool = True


@dataclass
class HardwareConfig:
    """The machine as the cost model sees it; sizes are strings such as ``24GiB`` or ``16GB``."""

    profile: Optional[str] = None  # preset name (t4-paper, h200) or YAML file; null: measure (cached)
    gpu_memory: Optional[str] = None  # cap; on CUDA also the process's allocator limit
    cpu_memory: Optional[str] = None  # cap for planning (policy: auto)
    disk_memory: Optional[str] = None  # cap for planning (policy: auto)
    threads: Any = "auto"  # intra-op threads of the engine: auto (see flexgen/threads.py) or a number


@dataclass
class OutputConfig:
    """Where results go. Metrics go to ``<path>.metrics.json``."""

    path: str = "outputs/predictions.jsonl"
    offload_dir: Optional[str] = None  # disk-tier folder; the engine's default when null
    order: str = "blocks"  # blocks: lines as blocks finish (cheap resume); prompts: rewritten in prompt order at the end


@dataclass
class FlexGenConfig:
    """The whole config; see README.md ("Config reference") for every key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # -- views used by the predict run -------------------------------------------------

    def to_policy(self) -> Policy:
        """The :class:`Policy` of this config (not meaningful when ``policy.auto``)."""
        values = {f.name: getattr(self.policy, f.name) for f in fields(Policy)}
        for name in ("weights_gpu", "weights_cpu", "cache_gpu", "cache_cpu", "act_gpu", "act_cpu"):
            if float(values[name]).is_integer():
                values[name] = int(values[name])
        return Policy(**values)

    def plugins_dict(self) -> dict[str, Any]:
        """The ``plugins`` argument of ``load_engine``: plain dicts and strings."""
        return {key: _plain(getattr(self.plugins, key)) for key in PLUGIN_KEYS}

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Engine.generate`` (the per-prompt sampling keys and the tokenizer,
        which stop strings need, are added by the caller).

        ``generation.stop`` mixes token ids and strings; the engine takes them apart, as HF's
        ``generate`` does (``eos_token_id`` and ``stop_strings``).
        """
        g = self.generation
        ids, strings = split_stop(_plain(g.stop))
        return {
            "max_new_tokens": g.max_new_tokens,
            "do_sample": g.do_sample,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "top_k": g.top_k,
            "repetition_penalty": g.repetition_penalty,
            "stop": ids or None,
            "stop_strings": strings or None,
            "seed": g.seed,
        }

    def threads(self) -> int | None:
        """``hardware.threads``: None for auto, else the number of intra-op threads."""
        from flexgen.threads import parse_threads

        return parse_threads(_plain(self.hardware.threads), "hardware.threads")

    def resolve_dtype(self, device: str) -> str:
        """Replace ``model.dtype: auto`` by its choice for ``device`` (``cpu`` or ``cuda``), once,
        before anything reads it: the job fingerprint, the cost model, the engine and the metrics
        then all see the dtype that really runs (:mod:`flexgen.dtypes`)."""
        from flexgen.dtypes import resolve_dtype

        self.model.dtype = resolve_dtype(self.model.dtype, device)
        return self.model.dtype

    def hardware_caps(self) -> dict[str, str]:
        """The ``hardware.*_memory`` caps that are set, as keyword arguments of ``with_caps``."""
        return {key: value for key in HARDWARE_CAPS if (value := getattr(self.hardware, key)) is not None}

    def to_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self), resolve=True)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def split_stop(stop: Any) -> tuple[list[int], list[str]]:
    """``generation.stop`` (null, an id, a string, or a list of both) as (token ids, stop strings)."""
    items = stop if isinstance(stop, list) else [] if stop is None else [stop]
    return [s for s in items if isinstance(s, int)], [s for s in items if isinstance(s, str)]


# --------------------------------------------------------------------------- loading

_INPUT_PATHS = (("model", "path"), ("model", "tokenizer"), ("data", "prompts"), ("hardware", "profile"))
#: input paths that may also be a name (a Hub tokenizer, a hardware preset): made file-relative only
#: when that file exists
_MAYBE_NAMES = ("tokenizer", "profile")


def load_config(path: str | os.PathLike | Mapping | None = None, overrides: list[str] | tuple[str, ...] = (),
                prompts_given: bool = False) -> FlexGenConfig:
    """Read a config (a file, or a mapping: a dict or a ``DictConfig``) and apply ``key=value``
    overrides; validate the result.

    Paths in a mapping are taken as written (relative to the current directory), as on the
    command line. ``prompts_given``: the caller brings the prompts (the Python batch API), so
    ``data.*`` need not name any. Raises :class:`ConfigError` (one line naming the key or file)
    for every user mistake.
    """
    schema = OmegaConf.structured(FlexGenConfig)
    layers: list[tuple[DictConfig, str]] = []
    if isinstance(path, Mapping):
        layers.append((_read_mapping(path), "in the given config"))
    elif path is not None:
        layers.append((_read_file(Path(path)), f"in {path}"))
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    for item in overrides:
        layers.append((_parse_override(item), "on the command line"))

    merged = schema
    auto_from: str | None = None
    for layer, where in layers:
        auto_from = _normalise_policy(layer, where, auto_from)
        _check_sections(layer, where)
        merged = _merge(merged, layer, where)
    try:
        cfg: FlexGenConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]  # resolves ${...}
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config key {exc.full_key or '?'!r}: {_first_line(exc)}") from exc
    validate(cfg, prompts_given)
    return cfg


def _read_mapping(config: Mapping) -> DictConfig:
    """A config given as a dict or a ``DictConfig`` (the Python batch API), as one layer."""
    try:
        raw = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else dict(config)
        return OmegaConf.create(raw)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"the given config: {_first_line(exc)}") from exc


def _read_file(path: Path) -> DictConfig:
    import yaml  # omegaconf's own dependency

    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (model, policy, ...), got {type(raw).__name__}")
    try:
        layer = OmegaConf.create(raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file {path}: {_first_line(exc)}") from exc
    _resolve_input_paths(layer, path.resolve().parent)
    return layer


def _resolve_input_paths(layer: DictConfig, base: Path) -> None:
    """Make the input paths written in a config file relative to the file's folder.

    ``model.tokenizer`` may also be a Hub name (``facebook/opt-125m``) and ``hardware.profile`` a
    preset name, so they are resolved only when the file-relative path exists. Values with ``${...}`` interpolations are left alone.
    """
    for section, key in _INPUT_PATHS:
        node = layer.get(section)
        if not isinstance(node, DictConfig):
            continue
        value = OmegaConf.to_container(node, resolve=False).get(key)  # ${...} left unresolved
        if not isinstance(value, str) or not value or value.startswith(BUILTIN_PREFIX) or "${" in value:
            continue
        expanded = Path(os.path.expanduser(value))
        if not expanded.is_absolute():
            expanded = base / expanded
            if key in _MAYBE_NAMES and not expanded.exists():
                continue
        node[key] = str(expanded)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


def _parse_override(item: str) -> DictConfig:
    import yaml  # omegaconf's own dependency

    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} must be key=value, e.g. policy.gpu_batch_size=8")
    key = item.split("=", 1)[0]
    if not _KEY.fullmatch(key):
        raise ConfigError(f"override {item!r}: {key!r} is not a config key (dotted names such as policy.gpu_batch_size)")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "not valid YAML"
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it for the shell, "
                          "e.g. 'plugins.attention={name: cpu}'") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {item!r}: {_first_line(exc)}") from exc


def _normalise_policy(layer: DictConfig, where: str, auto_from: str | None) -> str | None:
    """Turn ``policy: auto`` into ``policy.auto: true``; refuse policy keys mixed with auto."""
    if "policy" not in layer:
        return auto_from
    value = layer["policy"] if not OmegaConf.is_missing(layer, "policy") else None
    if isinstance(value, str):
        if value.strip().lower() != "auto":
            raise ConfigError(f"policy ({where}) must be a mapping of policy keys or 'auto', got {value!r}")
        layer["policy"] = {"auto": True}
        return where
    if isinstance(value, DictConfig):
        keys = [str(k) for k in value.keys() if k != "auto"]
        if value.get("auto") is False:
            return None
        if value.get("auto") is True:
            if keys:
                raise ConfigError(
                    f"policy.{keys[0]} ({where}) conflicts with policy.auto: true, which chooses every policy key; "
                    "drop one of them"
                )
            return where
        if keys and auto_from is not None:
            raise ConfigError(
                f"policy.{keys[0]} ({where}) conflicts with policy: auto ({auto_from}), which chooses every "
                "policy key; drop one of them"
            )
    return auto_from


def _check_sections(layer: DictConfig, where: str) -> None:
    """Catch a section given as a scalar (``policy: 3``), which omegaconf reports without a key,
    and a YAML boolean where a name or path belongs (``offload_dir: off`` is ``False`` in YAML,
    which omegaconf would quietly turn into a folder named ``False``)."""
    raw = OmegaConf.to_container(layer, resolve=False)
    for key, value in raw.items():
        key = str(key)
        if key not in _SECTION_TYPES:
            raise ConfigError(_unknown_key_message(key, where))
        if value is not None and not isinstance(value, dict) and not _is_interpolation(value):
            raise ConfigError(f"config key {key!r} ({where}) must be a mapping of {key} keys, got {value!r}")
        if isinstance(value, dict):
            strings = _string_keys(_SECTION_TYPES[key])
            for name, item in value.items():
                if name in strings and isinstance(item, bool):
                    raise ConfigError(
                        f"config key '{key}.{name}' ({where}) is the YAML boolean {str(item).lower()} (yes/no/on/off "
                        "are booleans in YAML); quote it if it is a name, e.g. 'off'"
                    )


def _string_keys(section: type) -> set[str]:
    """The fields of a schema section typed ``str`` or ``Optional[str]``."""
    hints = typing.get_type_hints(section)
    return {name for name, hint in hints.items() if hint is str or hint == Optional[str]}


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${")


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        raise ConfigError(_unknown_key_message(str(exc.full_key or exc.key), where)) from exc
    except OmegaConfBaseException as exc:
        key = exc.full_key or "?"
        raise ConfigError(f"config key {key!r} ({where}): {_type_problem(exc)}") from exc


_SECTION_TYPES = {
    "model": ModelConfig,
    "policy": PolicyConfig,
    "plugins": PluginsConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "trainer": TrainerConfig,
    "hardware": HardwareConfig,
    "output": OutputConfig,
}


def _known_keys(full_key: str) -> list[str]:
    """The full names of the schema keys beside ``full_key`` (for "did you mean")."""
    parts = full_key.split(".")
    if len(parts) == 1:
        return list(_SECTION_TYPES)
    section = _SECTION_TYPES.get(parts[0])
    if section is None or len(parts) > 2:
        return []
    return [f"{parts[0]}.{f.name}" for f in fields(section)]


def _unknown_key_message(full_key: str, where: str) -> str:
    known = _known_keys(full_key)
    close = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    if not close:  # compare the last part alone ("policy.gpu_batchsize" ~ "gpu_batch_size")
        last = full_key.split(".")[-1]
        names = {k.split(".")[-1]: k for k in known}
        close = [names[m] for m in difflib.get_close_matches(last, list(names), n=1, cutoff=0.6)]
    hint = f"; did you mean {close[0]!r}?" if close else (f"; known keys: {', '.join(known)}" if known else "")
    return f"unknown config key {full_key!r} ({where}){hint}"


def _type_problem(exc: OmegaConfBaseException) -> str:
    message = _first_line(exc)
    # omegaconf: "Value 'abc' of type 'str' could not be converted to Integer"
    return message.replace("could not be converted to Integer", "is not an integer").replace(
        "could not be converted to Float", "is not a number"
    )


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "msg", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


# --------------------------------------------------------------------------- validation


def validate(cfg: FlexGenConfig, prompts_given: bool = False) -> None:
    """Range and consistency checks the types alone cannot express; ConfigError naming the key."""
    m = cfg.model
    if (m.path is None) == (m.synthetic is None):
        raise ConfigError(
            "set exactly one of model.path (an HF checkpoint folder, or builtin:quickstart) and "
            f"model.synthetic (a model size), got model.path={m.path!r} model.synthetic={m.synthetic!r}"
        )
    if m.path is not None and m.path.startswith(BUILTIN_PREFIX):
        from flexgen.models.quickstart import BUILTINS

        name = m.path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"model.path: unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    if m.synthetic is not None:
        from flexgen.models.checkpoint import size_names, synthetic_spec

        if synthetic_spec(m.synthetic) is None:
            sizes = size_names()
            close = difflib.get_close_matches(m.synthetic.lower(), sizes, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; sizes: {', '.join(sizes)}"
            raise ConfigError(f"model.synthetic: unknown model size {m.synthetic!r}{hint}")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")

    if not cfg.policy.auto:
        try:
            cfg.to_policy()
        except FlexGenError as exc:  # PolicyError already names policy.<key>
            raise ConfigError(str(exc)) from exc

    for key in PLUGIN_KEYS:
        _check_plugin_value(f"plugins.{key}", _plain(getattr(cfg.plugins, key)), storage=key == "storage")

    d = cfg.data
    if d.prompts is None and not prompts_given:
        if d.num_prompts is None or d.prompt_len is None:
            raise ConfigError("set data.prompts (a .jsonl, .txt, .csv or .parquet file, or a saved dataset), or both "
                              "data.num_prompts and data.prompt_len")
    for key in ("num_prompts", "prompt_len"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {value}")

    g = cfg.generation
    if g.max_new_tokens < 1:
        raise ConfigError(f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    if not g.temperature > 0:
        raise ConfigError(f"generation.temperature must be > 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
    if g.top_k < 0:
        raise ConfigError(f"generation.top_k must be >= 0 (0: off), got {g.top_k}")
    if not g.repetition_penalty > 0:
        raise ConfigError(f"generation.repetition_penalty must be > 0 (1.0: off), got {g.repetition_penalty}")
    stop = _plain(g.stop)
    stops = stop if isinstance(stop, list) else [] if stop is None else [stop]
    for item in stops:
        if isinstance(item, bool) or not isinstance(item, (int, str)) or (isinstance(item, int) and item < 0) or item == "":
            raise ConfigError(
                "generation.stop must be null, a token id, a string, or a list of token ids and strings "
                f"(e.g. [2, \"###\"]), got {stop!r}"
            )

    t = cfg.trainer
    if t.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got {t.accelerator!r}")
    if t.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes must be >= 1, got {t.num_nodes}")
    _check_devices(_plain(t.devices))
    _check_hardware(cfg.hardware)
    if not cfg.output.path:
        raise ConfigError("output.path must name a .jsonl file")
    if cfg.output.order not in OUTPUT_ORDERS:
        raise ConfigError(f"output.order must be one of {', '.join(OUTPUT_ORDERS)}, got {cfg.output.order!r}")


def _check_devices(devices: Any) -> None:
    """``trainer.devices``: a count (``-1``: all), ``auto``, or a list of device indices."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if devices == "auto" or (is_int(devices) and (devices >= 1 or devices == -1)):
        return
    if isinstance(devices, list) and devices and all(is_int(d) and d >= 0 for d in devices):
        return
    raise ConfigError(f"trainer.devices must be a count >= 1, -1, 'auto' or a list of device indices, got {devices!r}")


def _check_hardware(h: "HardwareConfig") -> None:
    """Sizes parse (``24GiB``) and are positive; a profile is a preset or an existing file."""
    from flexgen.planner.hardware import PRESETS, parse_bytes

    for key in HARDWARE_CAPS:
        value = getattr(h, key)
        if value is not None and parse_bytes(value, f"hardware.{key}") <= 0:
            raise ConfigError(f"hardware.{key} must be more than 0 bytes, got {value!r}")
    from flexgen.threads import parse_threads

    parse_threads(_plain(h.threads), "hardware.threads")
    profile = h.profile
    if profile is not None and profile not in ("auto", "measure") and profile not in PRESETS:
        if not Path(os.path.expanduser(profile)).is_file():
            raise ConfigError(
                f"hardware.profile: {profile!r} is neither a preset ({', '.join(PRESETS)}) nor a file; "
                "null measures this machine"
            )


def _check_plugin_value(where: str, value: Any, storage: bool = False) -> None:
    if storage:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must map tiers (gpu, cpu, disk) to storage plugins, got {value!r}")
        for tier, spec in value.items():
            if tier not in ("gpu", "cpu", "disk"):
                close = difflib.get_close_matches(str(tier), ["gpu", "cpu", "disk"], n=1)
                hint = f"; did you mean '{where}.{close[0]}'?" if close else "; tiers: gpu, cpu, disk"
                raise ConfigError(f"unknown config key '{where}.{tier}' (not a tier){hint}")
            _check_plugin_value(f"{where}.{tier}", spec)
        return
    if isinstance(value, str) and value:
        return
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return
    raise ConfigError(f"{where} must be a plugin name or {{name: ..., <options>}}, got {value!r}")


def resolve_output_path(cfg: FlexGenConfig) -> Path:
    """``output.path`` as an absolute path (relative to the current directory)."""
    return Path(os.path.expanduser(cfg.output.path)).absolute()


def resolve_offload_dir(cfg: FlexGenConfig) -> str | None:
    """``output.offload_dir`` as an absolute path (relative to the current directory); None: the engine's default."""
    if cfg.output.offload_dir is None:
        return None
    return str(Path(os.path.expanduser(cfg.output.offload_dir)).absolute())


def to_yaml(cfg: FlexGenConfig, resolved: tuple[Policy, dict[str, Any], dict[str, Any]] | None = None) -> str:
    """The resolved config as YAML (``flexgen predict --print-config``).

    ``resolved``: what ``policy: auto`` resolved to (policy, plugins, info): the policy keys
    and plugins it chose are printed in place of ``auto``, under a comment saying so, so the
    output can be saved as a config that runs that very policy.
    """
    data = cfg.to_dict()
    auto = data["policy"].pop("auto")
    header = ""
    if auto and resolved is not None:
        policy, plugins, info = resolved
        data["policy"] = policy.to_dict()
        data["plugins"] = plugins
        predicted = info.get("predicted_throughput")
        machine = (info.get("hardware") or {}).get("name", "this machine")
        header = (f"# policy: auto, resolved by the cost model for {machine}"
                  + (f" (predicted {predicted:.1f} tok/s)" if predicted else "") + "\n")
    elif auto:
        data["policy"] = "auto"
    return header + OmegaConf.to_yaml(OmegaConf.create(data))
