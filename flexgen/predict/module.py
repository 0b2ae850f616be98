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

Each output line says why its sequence ended, ``"finish_reason"``: ``"stop"`` (a stop token or
stop string) or ``"length"`` (``max_new_tokens`` reached), as vLLM and the OpenAI API name them.
``"output_ids"`` end with the token that stopped the sequence (as HF's ``generate`` returns
them); ``"text"`` is cut just before a stop string (as vLLM and the OpenAI API return text: the
stop string is left out), while a stop *token* keeps its text unless it is a special token.
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
        extra = {"tokenizer": self.tokenizer} if self.generation.get("stop_strings") else {}
        outputs, reasons = self.engine.generate(batch["input_ids"], keys=keys, return_finish_reasons=True,
                                                **self.generation, **extra)
        texts = batch.get("texts") or [None] * len(batch["ids"])
        lines = []
        for pid, input_ids, text, output_ids, reason in zip(batch["ids"], batch["input_ids"], texts, outputs, reasons,
                                                            strict=True):
            line: dict[str, Any] = {"id": pid, "input_ids": list(input_ids), "output_ids": [int(t) for t in output_ids]}
            if self.tokenizer is not None:
                line["text"] = output_text(self.tokenizer, line["output_ids"], self.generation.get("stop_strings"), reason)
            if text is not None:
                line["prompt"] = text
            line["finish_reason"] = reason
            lines.append(line)
            self.tokens_generated += len(line["output_ids"])
        self.prompts_done += len(lines)
        return lines


def output_text(tokenizer: Any, output_ids: list[int], stop_strings: list[str] | None, finish_reason: str) -> str:
    """The new tokens as text (special tokens skipped), cut just before the first stop string it holds."""
    text = tokenizer.decode(output_ids, skip_special_tokens=True)
    if finish_reason == "stop" and stop_strings:
        found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if found:
            text = text[: min(found)]
    return text
