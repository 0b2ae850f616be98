"""The LightningModule of a predict run: one ``predict_step`` = one block through the engine.

The engine is held as a plain attribute, never as a submodule: Lightning moves a module's
parameters and buffers to its device, casts them for precision plugins and wraps the module for
strategies, and none of that may touch the engine's weights. Where each tensor lives is the
policy's decision, carried out by the engine's storage backends. So this module has no
parameters at all, and the engine (even if some engine were an ``nn.Module``) is stored past
``nn.Module.__setattr__``, where Lightning cannot see it.

In a predict run the engine is set once Lightning has started the processes and each knows its
device (:meth:`set_engine`, called by the run's coordinating callback), so that every process
loads its own engine and no engine is ever pickled to a spawned process.

Sampling (``generation.do_sample``): each prompt draws from its own random stream, keyed by
``generation.seed``, the prompt's id and its token ids (``Engine.generate(..., keys=...)``), so
a prompt's sampled tokens are the same whatever block it falls in, whatever prompts surround it,
after a resume and with any number of processes.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L


class FlexGenPredictModule(L.LightningModule):
    """Runs ``engine.generate`` on each block and returns the block's output lines."""

    def __init__(self, engine: Any, generation: dict[str, Any], tokenizer: Any = None):
        super().__init__()
        self.set_engine(engine)
        self.generation = dict(generation)
        self.tokenizer = tokenizer
        self.prompts_done = 0
        self.tokens_generated = 0

    def set_engine(self, engine: Any) -> None:
        """Hold ``engine`` (or None) outside Lightning's sight: not registered as a submodule, on purpose."""
        object.__setattr__(self, "engine", engine)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, Any]]:
        if not batch["ids"]:  # an empty block pads this rank's share to the common length
            return []
        keys = [json.dumps(pid) for pid in batch["ids"]]  # the engine mixes in the token ids
        outputs = self.engine.generate(batch["input_ids"], keys=keys, **self.generation)
        texts = batch.get("texts") or [None] * len(batch["ids"])
        lines = []
        for pid, input_ids, text, output_ids in zip(batch["ids"], batch["input_ids"], texts, outputs, strict=True):
            line: dict[str, Any] = {"id": pid, "input_ids": list(input_ids), "output_ids": [int(t) for t in output_ids]}
            if self.tokenizer is not None:
                line["text"] = self.tokenizer.decode(line["output_ids"], skip_special_tokens=True)
            if text is not None:
                line["prompt"] = text
            lines.append(line)
            self.tokens_generated += len(line["output_ids"])
        self.prompts_done += len(lines)
        return lines
