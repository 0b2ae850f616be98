"""``flexgen predict --config FILE [key=value ...]``: a config-driven, resumable predict run.

The order of work is chosen so that every user mistake is found before anything slow happens
and before the output file is touched:

1. config file + overrides -> validated :class:`~flexgen.config.FlexGenConfig`;
2. the model's shape (``config.json`` or a named OPT size) and its tokenizer;
3. the prompts: read, tokenised, checked against the vocabulary and the model's positions;
4. the policy (from the config, or from the cost model for ``policy: auto``);
5. every plugin is built once, so that it can refuse its own options; the offload folder is
   checked when the policy puts anything on disk; the job (:mod:`flexgen.predict.job`) is
   fingerprinted; the output folder is checked writable, and the files flexgen would replace
   next to the output are checked to be its own (:func:`plan_run` ends here);
6. the output is read (read-only): it must be this project's output, made by the same job for
   the same prompts (or the run is refused, unless ``--restart``); if it already holds every
   prompt, the run ends here, before any process is started or engine loaded;
7. Lightning's Trainer starts its processes (one, or ``trainer.devices x trainer.num_nodes``);
   once they are joined, :class:`~flexgen.predict.distributed.RunCoordinator` has rank 0 lock the
   output (one run per output), check it again under the lock, cut a torn tail (an interrupted
   run's), merge leftover part files and broadcast the ids done; each rank takes its share of
   the blocks and loads its own engine on its own device;
8. the predict loop runs one block per step, appending each block's lines durably (rank 0 to
   the output, the others to their part files); at the end rank 0 merges the part files,
   writes ``<output.path>.metrics.json`` atomically, and its summary is printed.

SIGTERM stops a run as Ctrl-C does (finished blocks are kept, one line), with exit status 143
instead of 130; see :func:`_sigterm_stops_the_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexgen.config import (
    BUILTIN_PREFIX, PLUGIN_KEYS, FlexGenConfig, load_config, resolve_offload_dir, resolve_output_path, to_yaml,
)
from flexgen.errors import CheckpointError, ConfigError, StorageError, Terminated
from flexgen.policy import Policy
from flexgen.predict.job import Job, check_own_json, job_settings

if TYPE_CHECKING:
    from flexgen.predict.data import Prompt

# Lightning, torch and transformers are imported inside the functions that need them: they take
# seconds to import, and a mistake in the config should be reported at once.

log = logging.getLogger(__name__)

#: (model, policy=, plugins=, device=, offload_dir=, dtype=, seed=) -> engine; load_engine's signature
EngineFactory = Callable[..., Any]


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a ConfigError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def predict_command(argv: list[str]) -> int:
    """Entry point of ``flexgen predict``; returns the exit status."""
    parser = _Parser(
        prog="flexgen predict",
        description="Generate for every prompt of a config. Rerun the same command to resume.",
        epilog="example: flexgen predict --config configs/quickstart.yaml generation.max_new_tokens=16",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and README.md)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--restart", action="store_true",
                        help="discard the lines already in output.path (flexgen output only) and generate every prompt "
                        "again, e.g. after changing the model or generation settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. policy.gpu_batch_size=8")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    with _cli_logging(), _sigterm_stops_the_run():
        summary = run_predict(cfg, restart=args.restart)
    if summary.get("rank", 0) == 0:  # with several processes, one summary is enough
        print(format_summary(summary))
    return 0


@contextlib.contextmanager
def _sigterm_stops_the_run():
    """While the command runs, SIGTERM raises :class:`~flexgen.errors.Terminated` (a KeyboardInterrupt).

    Schedulers stop jobs with SIGTERM; its default action kills the process on the spot, so the
    run could not say what it kept, close its engine or release its scratch files. Raised as a
    KeyboardInterrupt, it takes the path Ctrl-C takes: Lightning calls the callbacks'
    ``on_exception`` and tears the strategy down (and, under ``ddp``, stops the processes it
    started); the CLI prints one line and exits 143 (130 for Ctrl-C). A second SIGTERM while
    stopping is ignored. Only the main thread can install a handler; elsewhere (a test calling
    in from a thread) SIGTERM keeps its default.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _cli_logging():
    """Print flexgen's INFO messages as ``flexgen: ...`` on stderr while the command runs.

    Everything is put back afterwards, so calling the command in-process (tests) leaves the
    ``flexgen`` logger as it found it (propagation included, which pytest's caplog relies on).
    """
    logger = logging.getLogger("flexgen")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flexgen: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


# --------------------------------------------------------------------------- the run


@dataclass
class RunPlan:
    """Everything a run needs that can be worked out (and checked) before the output is touched."""

    model: str  # what load_engine gets: a checkpoint folder or an OPT size
    spec: Any  # OPTSpec
    tokenizer: Any
    prompts: list[Prompt]
    policy: Policy
    plugins: dict[str, Any]
    policy_info: dict[str, Any]
    out_path: Path
    job: Job
    restart: bool = False


def plan_run(cfg: FlexGenConfig, restart: bool = False) -> RunPlan:
    """Steps 1-5 of the module docstring, up to the lock: user mistakes surface here, the output untouched."""
    from flexgen.predict.data import load_prompts
    from flexgen.predict.writer import check_writable

    cfg.resolve_dtype("cuda" if _accelerator(cfg) == "gpu" else "cpu")
    model, model_dir, spec = resolve_model(cfg)
    weights = weights_identity(cfg, model_dir)
    tokenizer = load_tokenizer(cfg, model_dir)
    prompts = load_prompts(cfg, tokenizer, spec)
    policy, plugins, policy_info = resolve_policy(cfg, spec, prompts)
    offload_dir = check_offload_dir(cfg, policy)
    check_plugins(plugins, offload_dir)
    if not cfg.policy.auto:
        check_fits(cfg, spec, policy, plugins, prompts, offload_dir)
    job = Job(job_settings(weights, cfg.model.dtype, cfg.generation_kwargs(), plugins))
    out_path = resolve_output_path(cfg)
    check_writable(out_path)
    check_own_json(Path(f"{out_path}.metrics.json"), lambda obj: "generated_tokens" in obj and "config" in obj,
                   "a flexgen metrics file")
    return RunPlan(model, spec, tokenizer, prompts, policy, plugins, policy_info, out_path, job, restart)


def run_predict(cfg: FlexGenConfig, engine_factory: EngineFactory | None = None, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) the predict job a config describes; return the summary dict.

    ``engine_factory`` replaces :func:`flexgen.engine.load_engine` (tests pass a fake engine).
    ``restart`` discards what the output holds and generates every prompt again. With several
    processes every process calls this; the summary is rank 0's (``rank`` says which process
    returned it; the CLI prints rank 0's only).
    """
    from lightning.pytorch.utilities import rank_zero_only

    from flexgen.predict.data import PromptDataModule
    from flexgen.predict.writer import check_output

    started = time.perf_counter()
    plan = plan_run(cfg, restart)
    datamodule = PromptDataModule(plan.prompts, plan.policy.block_size)
    if rank_zero_only.rank != 0:
        # A process Lightning (or torchrun) started: rank 0 has checked the output and holds its
        # lock; it decides, under the lock, what is done, and broadcasts it.
        return _execute(cfg, plan, datamodule, engine_factory or _load_engine, started)
    # A read-only look first, so that a wrong output is refused and a finished one ends the run
    # before Lightning starts any process or loads any engine. Rank 0 checks again under the
    # output's lock, and settles a torn tail or part files of an interrupted run there.
    found = check_output(plan.out_path, plan.job, plan.prompts, restart)
    if not restart:
        datamodule.resume(found.state.done_ids)
        if datamodule.num_todo == 0 and not found.state.torn_bytes and not found.parts:
            return {**_summary_base(plan), "prompts_skipped": len(plan.prompts), "complete": True,
                    "wall_time_s": time.perf_counter() - started, "stats": None, "rank": 0}
    return _execute(cfg, plan, datamodule, engine_factory or _load_engine, started)


def _execute(cfg: FlexGenConfig, plan: RunPlan, datamodule: Any, engine_factory: EngineFactory,
             started: float) -> dict[str, Any]:
    """Run Lightning's predict loop over however many processes the trainer asks for."""
    from flexgen.predict.distributed import RunCoordinator
    from flexgen.predict.module import FlexGenPredictModule

    metrics_path = Path(f"{plan.out_path}.metrics.json")
    accelerator, devices = resolve_accelerator(cfg)

    hooks = _RunHooks(cfg, plan, engine_factory, started, metrics_path)
    coordinator = RunCoordinator(plan.out_path, plan.policy, plan.plugins, plan.policy_info, hooks.load, hooks.finish,
                                 gpu_memory=cfg.hardware.gpu_memory, job=plan.job, prompts=plan.prompts,
                                 restart=plan.restart)
    with _quiet_lightning():
        # The Trainer first: a bad trainer.* value should not wait for the model to load.
        trainer = make_trainer(cfg, plan.out_path, coordinator, accelerator, devices)
        module = FlexGenPredictModule(None, cfg.generation_kwargs(), plan.tokenizer)
        try:
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
        except SystemExit:
            # Lightning turns Ctrl-C (and our SIGTERM, a KeyboardInterrupt too) into sys.exit(1);
            # give the CLI its exception back so it can say that finished blocks are kept.
            if trainer.interrupted:
                raise (Terminated() if isinstance(coordinator.interrupted_by, Terminated) else KeyboardInterrupt()) from None
            raise
        finally:
            coordinator.close()

    rank = trainer.global_rank
    metrics = coordinator.metrics
    if metrics is None and rank == 0 and metrics_path.is_file():
        # ddp_spawn: the ranks ran in spawned processes; this one only waited for them.
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if metrics is None:
        return {**_summary_base(plan), "rank": rank, "complete": True, "stats": None,
                "wall_time_s": time.perf_counter() - started}
    return summary_from_metrics(plan, metrics, metrics_path)


@dataclass
class _RunHooks:
    """What the coordinator calls back: a class, not closures, so ``ddp_spawn`` can pickle it."""

    cfg: FlexGenConfig
    plan: RunPlan
    engine_factory: EngineFactory
    started: float
    metrics_path: Path

    def load(self, policy: Policy, plugins: dict[str, Any], device: str) -> Any:
        """This rank's engine. All ranks share ``output.offload_dir`` (see docs/distributed.md)."""
        cfg = self.cfg
        return self.engine_factory(self.plan.model, policy=policy, plugins=plugins, device=device,
                                   offload_dir=resolve_offload_dir(cfg), dtype=cfg.model.dtype, seed=cfg.model.seed,
                                   threads=cfg.threads())

    def finish(self, ranks: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, at the end: write the metrics of all ranks atomically."""
        metrics = build_metrics(self.cfg, self.plan, ranks, info, time.perf_counter() - self.started)
        write_json_atomic(self.metrics_path, metrics)
        return metrics


def _summary_base(plan: RunPlan) -> dict[str, Any]:
    return {
        "output": str(plan.out_path),
        "metrics": f"{plan.out_path}.metrics.json",
        "prompts_total": len(plan.prompts),
        "prompts_skipped": 0,
        "prompts_generated": 0,
        "tokens_generated": 0,
        "policy": plan.policy.to_dict(),
        "policy_source": plan.policy_info["source"],
    }


def build_metrics(cfg: FlexGenConfig, plan: RunPlan, ranks: list[dict[str, Any]], info: dict[str, Any],
                  wall_time_s: float) -> dict[str, Any]:
    """The metrics JSON: the ranks' engine figures aggregated, then each rank's own.

    ``wall_throughput`` is the tokens of all ranks over the longest rank's predict loop (what
    the user waits for, Lightning's overhead included); ``total_throughput`` is FlexGen's
    engine-time figure (see :func:`~flexgen.predict.distributed.aggregate_stats`).
    """
    from flexgen.predict.distributed import aggregate_stats

    stats = aggregate_stats([r["stats"] for r in ranks])
    generated = sum(r["prompts_generated"] for r in ranks)
    tokens = sum(r["tokens_generated"] for r in ranks)
    loop_time = max(r["loop_time_s"] for r in ranks)
    policy: Policy = info["policy"]
    return {
        **stats,
        "wall_time_s": wall_time_s,
        "wall_throughput": tokens / loop_time if loop_time > 0 else 0.0,
        "prompts": {"prompts_total": len(plan.prompts), "prompts_skipped": info["prompts_skipped"],
                    "prompts_generated": generated},
        "tokens_generated": tokens,
        "world_size": info["world_size"],
        "ranks": ranks,
        "policy": policy.to_dict(),
        "policy_source": info["policy_info"]["source"],
        "predicted_throughput": info["policy_info"].get("predicted_throughput"),
        "hardware": info["policy_info"].get("hardware"),
        "plugins": info["plugins"],
        "device": ranks[0]["device"],
        "model": {"source": plan.model, "spec": plan.spec.to_dict()},
        "config": cfg.to_dict(),
    }


def summary_from_metrics(plan: RunPlan, metrics: dict[str, Any], metrics_path: Path) -> dict[str, Any]:
    """What the CLI prints (and ``run_predict`` returns), from rank 0's metrics."""
    engine_keys = ("prefill_time_s", "decode_time_s", "prompt_tokens", "generated_tokens", "prefill_throughput",
                   "decode_throughput", "total_throughput", "bytes_moved", "peak_memory", "compression", "threads",
                   "dtype", "compute_dtype")
    return {
        **_summary_base(plan),
        **metrics["prompts"],
        "tokens_generated": metrics["tokens_generated"],
        "policy": metrics["policy"],
        "policy_source": metrics["policy_source"],
        "metrics": str(metrics_path),
        "complete": True,
        "wall_time_s": metrics["wall_time_s"],
        "wall_throughput": metrics["wall_throughput"],
        "world_size": metrics["world_size"],
        "stats": {k: metrics[k] for k in engine_keys if k in metrics},
        "rank": 0,
    }


def make_trainer(cfg: FlexGenConfig, out_path: Path, coordinator: Any, accelerator: str, devices: Any):
    """The ``lightning.Trainer`` of a predict run, with the JSONL writer and the run's coordinator.

    No logger, checkpointing or model summary (there is nothing to train or save); Lightning's
    distributed sampler off: :class:`PromptDataModule` shards the blocks itself, without the
    sampler's padding by repetition (a repeated block would be generated twice).
    """
    import lightning as L

    from flexgen.predict.callbacks import ThroughputProgressBar
    from flexgen.predict.writer import JsonlPredictionWriter

    callbacks: list[Any] = [JsonlPredictionWriter(out_path), coordinator]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(ThroughputProgressBar())
    try:
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, strategy=cfg.trainer.strategy,
            num_nodes=cfg.trainer.num_nodes, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=cfg.trainer.enable_progress_bar,
            callbacks=callbacks, use_distributed_sampler=False,
            # no_grad rather than inference_mode: tensors the engine creates during a step may be
            # kept and reused by it later, which inference tensors do not always allow.
            inference_mode=False,
            default_root_dir=str(out_path.parent),
        )
    except (ValueError, TypeError, RuntimeError) as exc:  # MisconfigurationException is a ValueError
        raise ConfigError(f"trainer: {str(exc).strip().splitlines()[0]}") from exc
    return trainer


@contextlib.contextmanager
def _quiet_lightning():
    """Hide Lightning's banners ("GPU available: ...") and notes that do not apply here."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Blocks are tiny lists served in-process, and the writer needs no batch indices.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_engine(model, **kwargs):
    try:
        from flexgen.engine import load_engine
    except ImportError as exc:
        raise ConfigError(f"the engine (flexgen.engine) cannot be imported in this build: {exc}") from exc
    return load_engine(model, **kwargs)


# --------------------------------------------------------------------------- pieces


def resolve_model(cfg: FlexGenConfig) -> tuple[str, Path | None, Any]:
    """(what to pass load_engine, the checkpoint folder or None, the OPTSpec), checked cheaply."""
    from flexgen.models.opt import OPTSpec, spec_for_size

    if cfg.model.synthetic is not None:
        try:
            return cfg.model.synthetic, None, spec_for_size(cfg.model.synthetic)
        except CheckpointError as exc:
            raise ConfigError(f"model.synthetic: {exc}") from exc
    path = cfg.model.path
    if path.startswith(BUILTIN_PREFIX):
        from flexgen.predict.quickstart import resolve_builtin

        folder = resolve_builtin(path[len(BUILTIN_PREFIX):])
    else:
        folder = Path(os.path.expanduser(path)).absolute()
    if not folder.exists():
        raise CheckpointError(
            f"model.path: {folder} does not exist; download an HF OPT checkpoint there, or run on random "
            "weights with model.path=null model.synthetic=<size>"
        )
    if not folder.is_dir():
        raise CheckpointError(f"model.path: {folder} is not a folder; an HF OPT checkpoint is a folder with config.json")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"model.path: {folder} has no config.json, so it is not an HF OPT checkpoint")
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
        spec = OPTSpec.from_hf_config(raw, name=str(folder))
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

    from flexgen.costmodel import Workload, estimate, estimate_options
    from flexgen.hardware import PRESETS, parse_bytes
    from flexgen.optimizer import violations

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
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad folder
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if explicit is not None:
            raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {source} ({message})") from exc
        log.warning("no usable tokenizer in %s (%s); text prompts and output text are unavailable", source, message)
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


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
        from flexgen.optimizer import auto_policy_for_run
    except ImportError as exc:
        raise ConfigError(
            f"policy: auto needs the cost-model optimizer (flexgen.optimizer), which cannot be imported ({exc}); "
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


def write_json_atomic(path: Path, obj: Any, key: str = "output.path") -> None:
    """Write JSON to a temporary sibling, fsync, rename over ``path``: never a half file.

    ``key`` names what the user set, for the one-line error (a full disk, say).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path} ({exc.strerror or exc})") from exc


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines printed at the end of a run."""
    lines = []
    skipped = summary["prompts_skipped"]
    if summary["prompts_generated"] == 0 and skipped == summary["prompts_total"]:
        lines.append(f"flexgen predict: all {skipped} prompts are already in the output; nothing to do")
    else:
        lines.append(
            f"flexgen predict: {summary['prompts_generated']} prompts generated ({skipped} already done), "
            f"{summary['tokens_generated']} new tokens in {summary['wall_time_s']:.1f} s"
        )
    stats = summary.get("stats") or {}
    generated = summary["prompts_generated"] > 0
    if stats and generated:
        lines.append(
            "  throughput: {:.1f} tok/s total (prefill {:.1f}, decode {:.1f}); engine time {:.2f} s prefill + {:.2f} s decode".format(
                stats.get("total_throughput", 0.0), stats.get("prefill_throughput", 0.0),
                stats.get("decode_throughput", 0.0), stats.get("prefill_time_s", 0.0), stats.get("decode_time_s", 0.0),
            )
        )
    p = summary["policy"]
    lines.append(
        f"  policy ({summary['policy_source']}): block {p['num_gpu_batches']} x {p['gpu_batch_size']}; "
        f"gpu/cpu/disk % weights {_tiers(p, 'weights')}, cache {_tiers(p, 'cache')}, activations {_tiers(p, 'act')}"
    )
    if generated and stats.get("dtype") and stats.get("compute_dtype") not in (None, stats["dtype"]):
        lines.append(f"  dtype: {stats['dtype']}, computed in {stats['compute_dtype']} (no native {stats['dtype']} "
                     "matrix instructions on this CPU)")
    threads = stats.get("threads") if generated else None
    if threads:
        from flexgen.threads import ThreadChoice

        lines.append(f"  {ThreadChoice.from_dict(threads).describe()}")
    if summary.get("world_size", 1) > 1 and generated:
        lines.append(f"  processes: {summary['world_size']}, together {summary['wall_throughput']:.1f} tok/s over the "
                     "predict loop (per-rank figures in the metrics)")
    lines.append(f"  output:  {summary['output']}")
    if stats:
        lines.append(f"  metrics: {summary['metrics']}")
    return "\n".join(lines)


def _tiers(p: dict[str, Any], kind: str) -> str:
    gpu, cpu = p[f"{kind}_gpu"], p[f"{kind}_cpu"]
    return f"{gpu:g}/{cpu:g}/{100 - gpu - cpu:g}"
