"""What a predict run shows while it works: the model loading, then the progress of generation.

Everything here writes to stderr, so that stdout holds only the summary a run prints at the end
(and can be piped or captured).

* :class:`LoadingReport`: before the engine is built, one line saying what is loaded where
  (tensors and bytes per tier, and the offload folder when weights go to disk); while the
  weights are placed, a progress bar, shown only when placing takes more than a few seconds
  (a first conversion of a large model into the offload folder); then one line with the time
  and how many tensors were converted or reused.
* :class:`ThroughputProgressBar`: Lightning's TQDM bar, counting prompts rather than blocks,
  with the new tokens and their rate (``tok/s``: new tokens over the wall time since the loop
  started, what the user actually waits for). Lightning's ``self.log`` is not available in
  predict loops, so the counts come from the module's counters.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

log = logging.getLogger("flexgen.predict")

#: seconds of placing weights before the loading bar appears (tqdm's ``delay``)
LOADING_BAR_DELAY_S = 2.0


class LoadingReport:
    """Says what loading the engine does; :meth:`progress` is the engine's ``progress`` callback."""

    def __init__(self, model: str, spec: Any, policy: Any, plugins: dict[str, Any], dtype: str, device: str,
                 offload_dir: str) -> None:
        from flexgen.planner.hardware import format_bytes
        from flexgen.predict.plan import weight_rows
        from flexgen.policy import TIERS

        rows = weight_rows(spec, policy, plugins["weight_compressor"], dtype)
        tensors = {t: sum(r["tensors"][t] for r in rows) for t in TIERS}
        size = {t: sum(r["bytes"][t] for r in rows) for t in TIERS}
        self.on_disk = tensors["disk"]
        self.offload_dir = offload_dir
        where = ", ".join(f"{tensors[t]} on the {t} tier ({format_bytes(size[t])})" for t in TIERS if tensors[t])
        log.info("loading %s (%s) on %s: %d weight tensors, %s", model, dtype, device, sum(tensors.values()), where)
        if self.on_disk:
            log.info("the %d disk-tier tensors live in the offload folder %s: converted there on first use, then "
                     "reused", self.on_disk, offload_dir)
        self._bar: Any = None
        self._started = time.perf_counter()

    def progress(self, placed: int, total: int, converted: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="placing weights", unit="layer", file=sys.stderr,
                             delay=LOADING_BAR_DELAY_S, leave=False, dynamic_ncols=True)
        self._bar.set_postfix({"converted": converted}, refresh=False)
        self._bar.update(placed - self._bar.n)

    def done(self, engine: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        converted = getattr(engine, "converted_weights", 0)
        what = ""
        if converted:
            what = f"; converted {converted} tensors into {self.offload_dir}"
        elif self.on_disk:
            what = f"; reused the {self.on_disk} converted tensors in {self.offload_dir}"
        log.info("model loaded in %.1f s%s", time.perf_counter() - self._started, what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class ThroughputProgressBar(TQDMProgressBar):
    """The TQDM predict bar on stderr, counting prompts, with the new tokens and ``tok/s`` in its postfix."""

    def __init__(self, total_prompts: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.total_prompts = total_prompts
        self._start: float | None = None

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc="generating", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, unit="prompt", bar_format=self.BAR_FORMAT)

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._start = time.perf_counter()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # the first block: the bar counts prompts, not blocks
            self.predict_progress_bar.reset(total=self.total_prompts)
            self.predict_progress_bar.set_description("generating")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        bar = self.predict_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = getattr(pl_module, "prompts_done", 0)
        bar.set_postfix(self.rates(pl_module), refresh=True)

    def rates(self, pl_module) -> dict[str, str]:
        elapsed = max(time.perf_counter() - (self._start or time.perf_counter()), 1e-9)
        tokens = getattr(pl_module, "tokens_generated", 0)
        return {"tokens": str(tokens), "tok/s": f"{tokens / elapsed:.1f}"}
