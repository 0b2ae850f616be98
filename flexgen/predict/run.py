"""The predict run: a config-driven, resumable job, from a validated config to the summary.

The order of work is chosen so that every user mistake is found before anything slow happens
and before the output file is touched:

1. config file + overrides -> validated :class:`~flexgen.config.FlexGenConfig`;
2. the model's shape (``config.json`` or a named OPT size) and its tokenizer;
3. the prompts: read, tokenised, checked against the vocabulary and the model's positions;
4. the policy (from the config, or from the cost model for ``policy: auto``);
5. every plugin is built once, so that it can refuse its own options; the offload folder is
   checked when the policy puts anything on disk; the job (:mod:`flexgen.predict.job`) is
   fingerprinted; the output folder is checked writable, and the files flexgen would replace
   next to the output are checked to be its own (:func:`flexgen.predict.resolve.plan_run`
   ends here);
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
instead of 130 (:mod:`flexgen.cli.predict`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexgen.atomic import write_json_atomic
from flexgen.config import FlexGenConfig, resolve_offload_dir
from flexgen.errors import ConfigError, Terminated
from flexgen.policy import Policy
from flexgen.predict.resolve import RunPlan, plan_run, resolve_accelerator
from flexgen.predict.summary import build_metrics, summary_base, summary_from_metrics

# Lightning, torch and transformers are imported inside the functions that need them: they take
# seconds to import, and a mistake in the config should be reported at once.

log = logging.getLogger(__name__)

#: (model, policy=, plugins=, device=, offload_dir=, dtype=, seed=) -> engine; load_engine's signature
EngineFactory = Callable[..., Any]


# --------------------------------------------------------------------------- the run


def run_predict(cfg: FlexGenConfig, engine_factory: EngineFactory | None = None, restart: bool = False,
                prompts: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the predict job a config describes; return the summary dict.

    ``engine_factory`` replaces :func:`flexgen.engine.load_engine` (tests pass a fake engine).
    ``restart`` discards what the output holds and generates every prompt again. ``prompts``
    replaces ``data.*`` (see :func:`plan_run`). With several processes every process calls
    this; the summary is rank 0's (``rank`` says which process returned it; the CLI prints
    rank 0's only).
    """
    from lightning.pytorch.utilities import rank_zero_only

    from flexgen.predict.data import PromptDataModule
    from flexgen.predict.writer import check_output

    started = time.perf_counter()
    plan = plan_run(cfg, restart, prompts)
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
            if cfg.output.order == "prompts":  # finished in block order by an earlier run: put it in order now
                from flexgen.predict.writer import OutputLock, reorder_output

                with OutputLock(plan.out_path):
                    reorder_output(plan.out_path, plan.prompts)
            return {**summary_base(plan), "prompts_skipped": len(plan.prompts), "complete": True,
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
                                 restart=plan.restart, order=cfg.output.order)
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
        return {**summary_base(plan), "rank": rank, "complete": True, "stats": None,
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
        """This rank's engine, saying what it loads where. All ranks share ``output.offload_dir``
        (see docs/distributed.md)."""
        from flexgen.engine import default_offload_dir
        from flexgen.predict.callbacks import LoadingReport

        cfg = self.cfg
        offload_dir = resolve_offload_dir(cfg)
        report = LoadingReport(self.plan.model, self.plan.spec, policy, plugins, cfg.model.dtype, device,
                               offload_dir or str(default_offload_dir()))
        try:
            engine = self.engine_factory(self.plan.model, policy=policy, plugins=plugins, device=device,
                                         offload_dir=offload_dir, dtype=cfg.model.dtype, seed=cfg.model.seed,
                                         threads=cfg.threads(), progress=report.progress)
        finally:
            report.close()
        report.done(engine)
        return engine

    def finish(self, ranks: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
        """Rank 0, at the end: write the metrics of all ranks atomically."""
        metrics = build_metrics(self.cfg, self.plan, ranks, info, time.perf_counter() - self.started)
        write_json_atomic(self.metrics_path, metrics)
        return metrics


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


