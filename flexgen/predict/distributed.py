"""One predict run over however many processes Lightning starts (data parallel).

``trainer.devices=N trainer.num_nodes=M trainer.strategy=ddp`` makes Lightning start N x M
processes (its subprocess launcher re-runs the command; ``torchrun`` or a cluster can start them
instead) and join them in one ``torch.distributed`` group. Every process has read the same
config and prompts; what must be decided once, by one process, and then shared, is done by
:class:`RunCoordinator`, a Lightning callback, with Lightning's and torch.distributed's
collectives (see docs/distributed.md for the whole design):

* **setup** (all processes are in the group): rank 0 locks the output, cuts a torn tail, merges
  part files an interrupted run left, and reads the ids done; it broadcasts them with its policy
  (``strategy.broadcast``), so every rank cuts the *same* blocks and takes its own share
  (:meth:`PromptDataModule.shard`). A mistake found by rank 0 (output locked by another run) is
  broadcast too, so every rank stops with the same one-line error instead of hanging. Each rank
  k > 0 then locks its part file, caps its GPU memory if asked (``hardware.gpu_memory``), and
  loads its own engine on its own device (``strategy.root_device``: ``cuda:<local_rank>``, or
  the CPU).
* **on_predict_end** (every rank gets there: shares are padded to one length): each rank closes
  its file; the ranks' figures are gathered on rank 0 (``torch.distributed.gather_object``),
  which merges the part files into the output and writes the aggregated metrics.
* **teardown / on_exception**: the engine is closed and the locks released, on every rank.

With one process all of this degenerates to the single-process run: no part files, broadcast
and gather return their input.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from flexgen.errors import ConfigError, FlexGenError
from flexgen.policy import Policy
from flexgen.predict.job import Job, job_path
from flexgen.predict.writer import (
    JsonlPredictionWriter, OutputLock, leftover_parts, merge_parts, part_path, prepare_output, reorder_output,
)

log = logging.getLogger(__name__)


class RunCoordinator(Callback):
    """Sets a predict run up on each rank, and gathers and writes its results on rank 0.

    ``load_engine(policy, plugins, device)`` builds this rank's engine; ``finish(ranks, info)``
    is called on rank 0 only, with every rank's figures, after the part files are merged, and
    returns the run's metrics (which it also writes).
    """

    def __init__(
        self,
        out_path: Path,
        policy: Policy,
        plugins: dict[str, Any],
        policy_info: dict[str, Any],
        load_engine: Callable[[Policy, dict[str, Any], str], Any],
        finish: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]],
        gpu_memory: str | None = None,
        job: Job | None = None,
        prompts: list[Any] | None = None,
        restart: bool = False,
        order: str = "blocks",
    ):
        self.out_path = out_path
        self.policy, self.plugins, self.policy_info = policy, plugins, policy_info
        self.load_engine, self.finish = load_engine, finish
        self.gpu_memory = gpu_memory
        self.job, self.prompts, self.restart = job, list(prompts or []), restart
        self.order = order  # output.order: "prompts" rewrites the finished output in prompt order
        self.metrics: dict[str, Any] | None = None  # set on rank 0 at the end
        self.prompts_skipped = 0
        self.interrupted_by: BaseException | None = None  # what stopped the loop, if anything did
        self._locks: list[Any] = []
        self._engine: Any = None
        self._writer: Any = None
        self._loop_started: float | None = None
        self._sigterm: Any = None  # the SIGTERM handler in force before Lightning installed its own

    # -- setup ---------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        rank, world_size = trainer.global_rank, trainer.world_size
        self._sigterm = signal.getsignal(signal.SIGTERM)
        decision: dict[str, Any] | None = None
        if rank == 0:
            try:
                self._locks.append(OutputLock(self.out_path).__enter__())
                done = prepare_output(self.out_path, self.job, self.prompts, restart=self.restart)
                decision = {"done_ids": done, "policy": self.policy.to_dict(), "plugins": self.plugins,
                            "policy_info": self.policy_info, "job": self.job.fingerprint}
            except FlexGenError as exc:
                decision = {"error": str(exc)}
        decision = trainer.strategy.broadcast(decision, src=0)
        if "error" in decision:
            self.close()
            raise ConfigError(decision["error"])

        # Rank 0's policy for everyone: the blocks (and so the shares) depend on its block size.
        self.policy = Policy.from_dict(decision["policy"])
        self.plugins, self.policy_info = decision["plugins"], decision["policy_info"]
        datamodule = trainer.datamodule
        datamodule.resume(decision["done_ids"], block_size=self.policy.block_size)
        self.prompts_skipped = datamodule.num_skipped
        share = datamodule.shard(rank, world_size)
        for callback in trainer.callbacks:
            if isinstance(callback, JsonlPredictionWriter):
                self._writer = callback
                callback.job = decision["job"]
                if rank > 0:
                    callback.path = part_path(self.out_path, rank)
                    self._locks.append(OutputLock(callback.path).__enter__())
            elif hasattr(callback, "total_prompts"):  # the progress bar: this rank's prompts
                callback.total_prompts = sum(len(b["ids"]) for b in share)

        if rank == 0:
            todo = sum(len(b["ids"]) for b in datamodule.batches)
            log.info("%d prompts to generate (%d already done) in %d blocks of up to %d, over %d process(es)", todo,
                     self.prompts_skipped, len(datamodule.batches), self.policy.block_size, world_size)
        device = trainer.strategy.root_device
        cap_gpu_memory(device, self.gpu_memory)
        self._engine = self.load_engine(self.policy, self.plugins, str(device))
        pl_module.set_engine(self._engine)

    # -- the loop ------------------------------------------------------------------------

    def on_predict_start(self, trainer, pl_module) -> None:
        self._loop_started = time.perf_counter()
        # Lightning has just put in its own SIGTERM handler, which forwards the signal to the
        # processes it started and runs a collective (a broadcast) inside the handler: in a
        # predict loop nobody answers it, and a second SIGTERM makes it wait forever. The run's
        # own handler (flexgen.cli.predict._sigterm_stops_the_run) stops the loop as Ctrl-C
        # does, and Lightning's interrupt handling then stops the processes it started.
        if self._sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm)

    def on_predict_end(self, trainer, pl_module) -> None:
        loop_time = time.perf_counter() - (self._loop_started or time.perf_counter())
        if self._writer is not None:
            self._writer.close()
        rank = trainer.global_rank
        if rank > 0:
            self._release_locks()  # rank 0 locks each part file again while merging it
        stats = getattr(self._engine, "stats", None)
        mine = {
            "rank": rank,
            "device": str(trainer.strategy.root_device),
            "prompts_generated": self._writer.lines_written if self._writer is not None else 0,
            "tokens_generated": getattr(pl_module, "tokens_generated", 0),
            "loop_time_s": loop_time,
            "stats": stats.to_dict() if stats is not None else {},
        }
        ranks = gather_objects(mine, trainer.world_size)
        if rank == 0:
            written = [part_path(self.out_path, r["rank"]) for r in ranks if r["rank"] > 0 and r["prompts_generated"]]
            missing = [part for part in written if not part.exists()]
            if missing:
                # Another node wrote it on a disk rank 0 cannot see: say so rather than lose it.
                raise ConfigError(
                    f"output.path: rank 0 cannot see {missing[0]} (and {len(missing) - 1} other part file(s)); "
                    "with several machines output.path must be on a filesystem they all share. Copy the part "
                    "files next to the output and rerun: their prompts count as done"
                )
            parts = leftover_parts(self.out_path)
            merged = merge_parts(self.out_path, parts)
            if self.order == "prompts":
                reorder_output(self.out_path, self.prompts)
            info = {"merged_lines": merged, "policy": self.policy, "plugins": self.plugins,
                    "policy_info": self.policy_info, "prompts_skipped": self.prompts_skipped,
                    "world_size": trainer.world_size}
            self.metrics = self.finish(ranks, info)

    # -- the end, however it comes ---------------------------------------------------------

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.interrupted_by = exception
        self.close()

    def close(self) -> None:
        """Close this rank's engine and file, release its locks; safe to call more than once."""
        if self._writer is not None:
            self._writer.close()
        engine, self._engine = self._engine, None
        try:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        finally:
            self._release_locks()
            # A run that ended before its first line leaves no output (the lock removes the empty
            # file it created), and so no job file either.
            if self.job is not None and not self.out_path.exists():
                recorded = job_path(self.out_path)
                try:
                    if json.loads(recorded.read_text(encoding="utf-8")).get("fingerprint") == self.job.fingerprint:
                        recorded.unlink()
                except (OSError, ValueError, AttributeError):
                    pass

    def _release_locks(self) -> None:
        while self._locks:
            self._locks.pop().__exit__(None, None, None)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (in rank order), ``[obj]`` elsewhere and in one process."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if gathered is not None else [obj]


def aggregate_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One set of engine figures for ranks that ran side by side.

    Tokens and bytes moved add up; times are the longest rank's (the ranks run concurrently,
    so the job takes as long as its slowest rank), and throughputs are the summed tokens over
    those times: FlexGen's definition, for the whole job. Peak memory and compression sizes
    are per process, so the largest rank's. One rank's figures come back unchanged.
    """
    if len(per_rank) == 1:
        return dict(per_rank[0])
    ranks = [s for s in per_rank if s]
    if not ranks:
        return {}

    def total(key: str) -> float:
        return sum(s.get(key, 0) for s in ranks)

    def longest(key: str) -> float:
        return max(s.get(key, 0.0) for s in ranks)

    def per_key(key: str, combine: Callable[[list[Any]], Any]) -> dict[str, Any]:
        names = dict.fromkeys(k for s in ranks for k in s.get(key, {}))
        return {name: combine([s.get(key, {}).get(name, 0) for s in ranks]) for name in names}

    def rate(tokens: float, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    prompt_tokens, generated = total("prompt_tokens"), total("generated_tokens")
    prefill, decode = longest("prefill_time_s"), longest("decode_time_s")
    engine_time = max(s.get("prefill_time_s", 0.0) + s.get("decode_time_s", 0.0) for s in ranks)
    return {
        "prefill_time_s": prefill,
        "decode_time_s": decode,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prefill_throughput": rate(prompt_tokens, prefill),
        "decode_throughput": rate(generated, decode),
        "total_throughput": rate(generated, engine_time),
        "bytes_moved": per_key("bytes_moved", sum),
        "peak_memory": per_key("peak_memory", max),
        "compression": per_key("compression", max),
    }


def cap_gpu_memory(device: Any, size: str | None) -> float | None:
    """Limit this process's CUDA allocator to ``size`` (``hardware.gpu_memory``) on ``device``.

    ``torch.cuda.set_per_process_memory_fraction`` makes allocations past the cap fail as if the
    GPU were that small, so one machine can stand in for a smaller GPU. Nothing happens without
    a cap or off CUDA. Returns the fraction set, or None.
    """
    import torch

    from flexgen.planner.hardware import format_bytes, parse_bytes

    device = torch.device(device)
    if size is None or device.type != "cuda":
        return None
    cap = parse_bytes(size, "hardware.gpu_memory")
    total = torch.cuda.get_device_properties(device).total_memory
    if cap >= total:
        log.warning("hardware.gpu_memory = %s is not less than %s has (%s); no cap set",
                    format_bytes(cap), device, format_bytes(total))
        return None
    fraction = cap / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("GPU memory capped at %s (%.1f%% of %s)", format_bytes(cap), 100 * fraction, device)
    return fraction
