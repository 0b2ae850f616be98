"""Lightning's progress bar, with the generation rate beside it.

Lightning's ``self.log`` is not available in predict loops, so the rate cannot travel through
logged metrics; this subclass of the stock TQDM bar reads the counters the module keeps and puts
them in the bar's postfix after every block: ``tok/s`` (new tokens over wall time since the
loop started, what the user actually waits for) and the number of prompts done.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class ThroughputProgressBar(TQDMProgressBar):
    """The TQDM predict bar (one step per block) with ``tok/s`` and ``prompts`` in its postfix."""

    def __init__(self, total_prompts: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.total_prompts = total_prompts
        self._start: float | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.predict_progress_bar.set_postfix(self.rates(pl_module), refresh=True)

    def rates(self, pl_module) -> dict[str, str]:
        elapsed = max(time.perf_counter() - (self._start or time.perf_counter()), 1e-9)
        done = getattr(pl_module, "prompts_done", 0)
        prompts = f"{done}/{self.total_prompts}" if self.total_prompts else str(done)
        return {"tok/s": f"{getattr(pl_module, 'tokens_generated', 0) / elapsed:.1f}", "prompts": prompts}
