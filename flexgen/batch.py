"""``flexgen.batch_generate``: a batch job from Python, run exactly as ``flexgen predict`` runs it.

::

    from flexgen import batch_generate
    results = batch_generate("configs/quickstart.yaml", ["The policy says", "Each block"],
                             overrides=["generation.max_new_tokens=16"])
    for r in results:
        print(r.finish_reason, r.text)

Why it is built on the predict run rather than on :meth:`flexgen.engine.Engine.generate`: a
batch job needs everything ``flexgen predict`` does before and around the engine (the model's
tokenizer, prompts checked against the model, length-sorted blocks, ``policy: auto``, every
plugin checked, the memory check, Lightning's loop and progress bar), and a second copy of that
would drift. So the prompts go to :func:`flexgen.predict.run.run_predict` in place of
``data.*``, its output lines are written to a temporary folder, read back and returned in the
order of the input; the folder is then deleted. ``output.path`` of the config is not used
(nothing of the user's is written), and there is no resume: a call is one job.

Decisions where users of vLLM's ``LLM.generate`` and HF pipelines would expect something:

* results come back in input order, one per prompt, whatever order the blocks ran in;
* a result holds the prompt (its text when it was given as text), the prompt's token ids, the
  new text (``None`` when the model has no tokenizer), the new token ids and the finish reason
  (``"stop"`` or ``"length"``), the field names of vLLM's ``RequestOutput``/``CompletionOutput``;
* it runs in this process, on one device: ``trainer.devices`` and ``trainer.num_nodes`` must
  be 1 (several processes are ``flexgen predict``'s job, since they re-run the command);
* flexgen's log lines go through the ``flexgen`` logger (configure ``logging`` to see them); the
  progress bar is shown on stderr unless ``trainer.enable_progress_bar=false``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from flexgen.config import load_config
from flexgen.errors import ConfigError

#: what ``config`` may be: a YAML file, or the same content as a dict or an omegaconf DictConfig
ConfigSource = Union[str, os.PathLike, Mapping]


@dataclass(frozen=True)
class Completion:
    """The result for one prompt."""

    index: int  # its position in the input list
    prompt: Optional[str]  # the prompt's text; None when it was given as token ids
    prompt_token_ids: list[int]
    text: Optional[str]  # the new text, cut before a stop string; None without a tokenizer
    token_ids: list[int]  # the new tokens, ending with the one that stopped the sequence
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens reached)


def batch_generate(config: ConfigSource, prompts: Sequence[str] | Sequence[Sequence[int]],
                   overrides: Sequence[str] = ()) -> list[Completion]:
    """Generate for every prompt as ``flexgen predict`` would with this config; results in input order.

    ``config``: a YAML file (as for ``flexgen predict --config``), a dict or a ``DictConfig``;
    ``overrides``: ``key=value`` strings, as on the command line. ``prompts``: strings
    (tokenised with the model's tokenizer) or lists of token ids. User mistakes raise
    :class:`flexgen.errors.FlexGenError` with a one-line message naming the key or prompt.
    """
    from flexgen.predict.run import run_predict

    cfg = load_config(config, overrides if isinstance(overrides, str) else list(overrides), prompts_given=True)
    if cfg.trainer.devices not in (1, [0]) or cfg.trainer.num_nodes != 1:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} trainer.num_nodes={cfg.trainer.num_nodes}: batch_generate runs in "
            "this process on one device; use flexgen predict for several processes"
        )
    with tempfile.TemporaryDirectory(prefix="flexgen-batch-") as folder:
        cfg.output.path = str(Path(folder) / "outputs.jsonl")
        run_predict(cfg, prompts=prompts)
        with open(cfg.output.path, encoding="utf-8") as f:
            lines = {line["id"]: line for line in map(json.loads, f)}
    return [_completion(lines[i]) for i in range(len(lines))]


def _completion(line: dict[str, Any]) -> Completion:
    return Completion(index=line["id"], prompt=line.get("prompt"), prompt_token_ids=line["input_ids"],
                      text=line.get("text"), token_ids=line["output_ids"], finish_reason=line["finish_reason"])
