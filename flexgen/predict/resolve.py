"""What a predict run resolves to before anything slow happens: model, tokenizer, prompts, policy, job.

Every user mistake is found here, in the order :mod:`flexgen.predict.run` describes, before
an engine is loaded or the output touched: the model's shape and weights' identity, the
tokenizer (a hub id without network fails at once), the prompts, the policy (``policy:
auto`` priced by the planner), every plugin built once to check its options, the offload
folder, whether the blocks fit the machine, and the job's fingerprint against the output's.
:func:`plan_run` does all of it and returns the :class:`RunPlan`; ``flexgen plan`` and
``flexgen bench`` reuse the same pieces.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexgen.config import BUILTIN_PREFIX, PLUGIN_KEYS, FlexGenConfig, resolve_offload_dir, resolve_output_path
from flexgen.errors import CheckpointError, ConfigError, StorageError
from flexgen.policy import Policy
from flexgen.predict.job import Job, check_own_json, job_settings

if TYPE_CHECKING:
    from flexgen.predict.data import Prompt

log = logging.getLogger(__name__)


def resolve_model(cfg: FlexGenConfig) -> tuple[str, Path | None, Any]:
    """(what to pass load_engine, the checkpoint folder or None, the model's spec), checked cheaply.

    Any registered family: config.json's model_type chooses it, a synthetic name is looked up
    among every family's sizes.
    """
    from flexgen.models.checkpoint import size_names, synthetic_spec
    from flexgen.models.families import family_for_config

    if cfg.model.synthetic is not None:
        spec = synthetic_spec(cfg.model.synthetic)
        if spec is None:
            raise ConfigError(f"model.synthetic: unknown size {cfg.model.synthetic!r}; sizes: {', '.join(size_names())}")
        return cfg.model.synthetic, None, spec
    path = cfg.model.path
    if path.startswith(BUILTIN_PREFIX):
        from flexgen.models.quickstart import resolve_builtin

        folder = resolve_builtin(path[len(BUILTIN_PREFIX):])
    else:
        folder = Path(os.path.expanduser(path)).absolute()
    if not folder.exists():
        raise CheckpointError(
            f"model.path: {folder} does not exist; download an HF checkpoint there, or run on random "
            "weights with model.path=null model.synthetic=<size>"
        )
    if not folder.is_dir():
        raise CheckpointError(f"model.path: {folder} is not a folder; an HF checkpoint is a folder with config.json")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"model.path: {folder} has no config.json, so it is not an HF checkpoint")
    from flexgen.models.checkpoint import read_small

    try:
        raw = json.loads(read_small(config_file).decode("utf-8"))
    except CheckpointError as exc:
        raise CheckpointError(f"model.path: {exc}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"model.path: cannot read {config_file} as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"model.path: {config_file} is not a JSON object")
    try:
        spec = family_for_config(raw, name=str(folder)).spec_from_hf_config(raw, name=str(folder))
    except CheckpointError as exc:
        raise CheckpointError(f"model.path: {exc}") from exc
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"model.path: {folder} has no weight files (*.safetensors or *.bin)")
    return str(folder), folder, spec


def weights_identity(cfg: FlexGenConfig, model_dir: Path | None) -> str:
    """What the job fingerprint records of the weights; a checkpoint is checked whole on the way.

    A checkpoint folder is opened as the engine will open it (headers read and checked, every
    weight ``config.json`` implies looked up with its shape), so a damaged or incomplete
    checkpoint is one line now, before the output is touched, rather than later, and its
    content fingerprint names it (see :mod:`flexgen.models.checkpoint`). Synthetic weights are
    named by their size and seed.
    """
    if model_dir is None:
        return f"synthetic {cfg.model.synthetic.lower().removeprefix('facebook/')} seed {cfg.model.seed}"
    from flexgen.models.checkpoint import HFCheckpoint

    try:
        checkpoint = HFCheckpoint(model_dir)
        checkpoint.check()
        return f"checkpoint {checkpoint.content_fingerprint()}"
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith("model.path") else f"model.path: {message}") from exc


def uses_disk(policy: Policy) -> bool:
    """Whether a policy puts any weights, cache or activations on the disk tier."""
    return any(policy.percents(kind)["disk"] > 0 for kind in ("weights", "cache", "act"))


def check_offload_dir(cfg: FlexGenConfig, policy: Policy) -> Path:
    """The offload folder (``output.offload_dir`` or the default), checked usable when the policy needs it.

    It must be a folder (or creatable) and writable; a file there, or a folder flexgen cannot
    write, is one line naming it instead of a traceback in the middle of the conversion.
    """
    from flexgen.engine import default_offload_dir

    folder = Path(resolve_offload_dir(cfg) or default_offload_dir())
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"output.offload_dir: {folder} is a file, not a folder")
    if uses_disk(policy):
        probe = folder / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"output.offload_dir: cannot write to {folder} ({exc.strerror or exc}); the policy "
                               "puts tensors on disk there") from exc
    return folder


def check_fits(cfg: FlexGenConfig, spec: Any, policy: Policy, plugins: dict[str, Any], prompts: list[Prompt],
               offload_dir: Path) -> None:
    """Refuse a policy whose blocks need more memory than this machine has, before anything is allocated.

    The engine allocates a whole block (``gpu_batch_size x num_gpu_batches`` sequences, padded
    when fewer prompts are left) and its KV cache up front; ``policy.gpu_batch_size=100000000``
    would otherwise grind the machine into swap or the OOM killer instead of saying anything.
    The cost model's peak bytes per tier (the estimate ``policy: auto`` plans with) are compared
    with what the machine physically has (RAM, the GPU's memory, the offload folder's disk),
    capped by ``hardware.*_memory`` when set, with no safety margin: only a clear overcommit is
    refused. Plugins the cost model does not price (a third-party attention, say) skip the check.
    """
    import dataclasses
    import shutil

    import psutil

    from flexgen.planner.costmodel import Workload, estimate, estimate_options
    from flexgen.planner.hardware import PRESETS, parse_bytes
    from flexgen.planner.optimizer import violations

    try:
        options = estimate_options(plugins)
    except ConfigError:
        return
    cuda = _accelerator(cfg) == "gpu"
    ram = psutil.virtual_memory().total
    if cuda:
        import torch

        gpu = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu = ram
    existing = next(p for p in [offload_dir, *offload_dir.parents] if p.exists())
    have = {"gpu": gpu, "cpu": ram, "disk": shutil.disk_usage(existing).total}
    for tier, cap in cfg.hardware_caps().items():
        have[tier.removesuffix("_memory")] = min(have[tier.removesuffix("_memory")], parse_bytes(cap, f"hardware.{tier}"))
    machine = dataclasses.replace(PRESETS["t4-paper"], name="this machine", device="cuda" if cuda else "cpu",
                                  gpu_memory=have["gpu"], cpu_memory=have["cpu"], disk_memory=have["disk"],
                                  shared_memory=not cuda)
    workload = Workload(max(len(p.input_ids) for p in prompts), cfg.generation.max_new_tokens, len(prompts))
    est = estimate(spec, policy, workload, machine, dtype=cfg.model.dtype, memory_only=True, **options)
    short = violations(est, machine, {"gpu": 1.0, "cpu": 1.0, "disk": 1.0})
    if short:
        raise ConfigError(
            f"policy: a block of {policy.num_gpu_batches} x {policy.gpu_batch_size} sequences does not fit this machine "
            f"({short[0]}); lower policy.gpu_batch_size or policy.num_gpu_batches, or offload more "
            "(flexgen policy --model ... suggests a policy that fits)"
        )


def check_plugins(plugins: dict[str, Any], offload_dir: Path) -> None:
    """Build every plugin the run selects once, so that each can refuse its options now (one line, exit 2).

    The engine builds them again for real; these are dropped at once (storage backends closed).
    """
    from flexgen import registry
    from flexgen.engine import DEFAULT_PLUGINS

    for key in ("attention", "weight_compressor", "cache_compressor", "scheduler"):
        kind = {"weight_compressor": "compressor", "cache_compressor": "compressor"}.get(key, key)
        registry.create(kind, plugins[key], where=f"plugins.{key}")
    storage = {**DEFAULT_PLUGINS["storage"], **dict(plugins.get("storage") or {})}
    for tier, spec in storage.items():
        backend = registry.create("storage", spec, where=f"plugins.storage.{tier}", compute_device="cpu",
                                  offload_dir=offload_dir, pin_memory=False)
        close = getattr(backend, "close", None)
        if close is not None:
            close()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(cfg: FlexGenConfig, model_dir: Path | None) -> Any:
    """``model.tokenizer`` (required to load when given), else the checkpoint's own, else None."""
    explicit = cfg.model.tokenizer
    source = explicit
    if source is None:
        if model_dir is None or not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            return None
        source = str(model_dir)
    else:
        source = os.path.expanduser(source)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if explicit is not None and not Path(source).is_dir():
            return _hub_tokenizer(source)
        return AutoTokenizer.from_pretrained(source)
    except ConfigError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad folder
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if explicit is not None:
            raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {source} ({message})") from exc
        log.warning("no usable tokenizer in %s (%s); text prompts and output text are unavailable", source, message)
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def _hub_tokenizer(source: str) -> Any:
    """``model.tokenizer`` naming no folder: a hub id, loaded from the local cache when it is there.

    Without a network, transformers retries the hub for about a minute before it gives up; a
    batch job on an offline machine should say at once what is wrong. So a name that looks like
    a path must exist, the local cache is tried first (no network at all), and the hub is only
    called when ``HF_HUB_OFFLINE`` is not set and its host answers within a few seconds.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from transformers import AutoTokenizer

    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a hub id is "name" or "owner/name"
        raise ConfigError(f"model.tokenizer: folder {source} does not exist")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # not in the cache (OSError), or a damaged cached copy: try the hub below
        pass
    hint = f"download it first (hf download {source}) or name a tokenizer folder"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model.tokenizer: {source} is neither a folder nor in the Hugging Face cache, and "
                          f"HF_HUB_OFFLINE is set; {hint}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"model.tokenizer: {source} is neither a folder nor in the Hugging Face cache, and "
                          f"{url.hostname} cannot be reached ({exc.strerror or exc}); {hint}") from exc
    return AutoTokenizer.from_pretrained(source)


def resolve_policy(cfg: FlexGenConfig, spec: Any, prompts: list[Prompt]) -> tuple[Policy, dict[str, Any], dict[str, Any]]:
    """(policy, plugins, info): the config's, or the cost model's choice for ``policy: auto``.

    With ``auto``, the attention backend and compressors the optimizer names replace the
    config's ``plugins`` entries of the same keys; storage and scheduler stay as configured.
    """
    plugins = cfg.plugins_dict()
    if not cfg.policy.auto:
        return cfg.to_policy(), plugins, {"source": "config"}
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        # A process Lightning (or torchrun) started as rank > 0: rank 0's choice is broadcast to
        # it before it is used (RunCoordinator.setup), so it neither plans nor measures the machine
        # (N processes timing copies at once would also measure each other).
        return Policy(), plugins, {"source": "auto"}
    try:
        from flexgen.planner.optimizer import auto_policy_for_run
    except ImportError as exc:
        raise ConfigError(
            f"policy: auto needs the cost-model optimizer (flexgen.planner.optimizer), which cannot be imported ({exc}); "
            "set the policy keys instead"
        ) from exc
    # The machine the cost model plans for: hardware.profile (a preset or file; null measures
    # this machine's compute device, cached), with the config's hardware.*_memory caps applied.
    device = "cuda" if _accelerator(cfg) == "gpu" else "cpu"
    choice = auto_policy_for_run(
        spec, prompt_len=max(len(p.input_ids) for p in prompts), gen_len=cfg.generation.max_new_tokens,
        num_prompts=len(prompts), device=device, dtype=cfg.model.dtype, hardware=cfg.hardware.profile,
        **cfg.hardware_caps(),
    )
    for key, value in dict(getattr(choice, "plugins", None) or {}).items():
        if key in PLUGIN_KEYS:
            plugins[key] = value
        else:
            log.warning("policy: auto chose plugin %r=%r, which is not a plugins key; ignored", key, value)
    info = {"source": "auto", "predicted_throughput": getattr(choice, "predicted_throughput", None)}
    hardware = getattr(choice, "hardware", None)
    if hardware is not None:
        info["hardware"] = {"name": hardware.name, "source": hardware.source,
                            "capacity": {t: getattr(hardware, f"{t}_memory") for t in ("gpu", "cpu", "disk")}}
    log.info("policy: auto chose %s (predicted %.1f tok/s)", choice.policy, info["predicted_throughput"] or 0.0)
    return choice.policy, plugins, info


def resolved_policy(cfg: FlexGenConfig) -> tuple[Policy, dict[str, Any], dict[str, Any]]:
    """(policy, plugins, info) as the run would resolve them: ``policy: auto`` asks the cost model."""
    from flexgen.predict.data import load_prompts

    cfg.resolve_dtype("cuda" if _accelerator(cfg) == "gpu" else "cpu")
    _, model_dir, spec = resolve_model(cfg)
    prompts = load_prompts(cfg, load_tokenizer(cfg, model_dir), spec)
    return resolve_policy(cfg, spec, prompts)


def resolve_accelerator(cfg: FlexGenConfig) -> tuple[str, Any]:
    """(Lightning accelerator, Lightning devices) from ``trainer.*``.

    Each process's engine computes on the device Lightning gives that process
    (``strategy.root_device``: ``cuda:<local rank>``, or the CPU).
    """
    import torch

    accelerator = _accelerator(cfg)
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is available; use trainer.accelerator=cpu"
        )
    return accelerator, _plain_devices(cfg.trainer.devices)


def _accelerator(cfg: FlexGenConfig) -> str:
    """``trainer.accelerator`` as Lightning's ``gpu`` or ``cpu``; ``auto`` is ``gpu`` where CUDA is available."""
    accelerator = cfg.trainer.accelerator
    if accelerator == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator in ("gpu", "cuda") else "cpu"


def _plain_devices(devices: Any) -> Any:
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(devices) if isinstance(devices, ListConfig) else devices


@dataclass
class RunPlan:
    """Everything a run needs that can be worked out (and checked) before the output is touched."""

    model: str  # what load_engine gets: a checkpoint folder or an OPT size
    spec: Any  # the model family's spec (OPTSpec, LlamaSpec, ...)
    tokenizer: Any
    prompts: list[Prompt]
    policy: Policy
    plugins: dict[str, Any]
    policy_info: dict[str, Any]
    out_path: Path
    job: Job
    restart: bool = False


def plan_run(cfg: FlexGenConfig, restart: bool = False, prompts: Sequence[Any] | None = None) -> RunPlan:
    """Steps 1-5 of the module docstring, up to the lock: user mistakes surface here, the output untouched.

    ``prompts``: strings or token-id lists given from Python (:func:`flexgen.batch_generate`)
    instead of ``data.*``.
    """
    from flexgen.predict.data import load_prompts
    from flexgen.predict.writer import check_writable

    cfg.resolve_dtype("cuda" if _accelerator(cfg) == "gpu" else "cpu")
    model, model_dir, spec = resolve_model(cfg)
    weights = weights_identity(cfg, model_dir)
    tokenizer = load_tokenizer(cfg, model_dir)
    if tokenizer is None and cfg.generation_kwargs()["stop_strings"]:
        raise ConfigError("generation.stop: stop strings need a tokenizer, and this model has none; set "
                          "model.tokenizer, or give stop token ids instead")
    loaded = load_prompts(cfg, tokenizer, spec, prompts)
    policy, plugins, policy_info = resolve_policy(cfg, spec, loaded)
    offload_dir = check_offload_dir(cfg, policy)
    check_plugins(plugins, offload_dir)
    if not cfg.policy.auto:
        check_fits(cfg, spec, policy, plugins, loaded, offload_dir)
    job = Job(job_settings(weights, cfg.model.dtype, cfg.generation_kwargs(), plugins))
    out_path = resolve_output_path(cfg)
    check_writable(out_path)
    check_own_json(Path(f"{out_path}.metrics.json"), lambda obj: "generated_tokens" in obj and "config" in obj,
                   "a flexgen metrics file")
    return RunPlan(model, spec, tokenizer, loaded, policy, plugins, policy_info, out_path, job, restart)
