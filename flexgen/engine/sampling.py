"""Sampling: the next token of each sequence from its logits, and where a sequence stops.

Greedy, or sampled through HF transformers' logits processors, with each prompt drawing from
its own random stream: a digest of the seed, the prompt's key and its token ids. What a
prompt samples then depends on nothing else: not on the block size, the other prompts or
their order, so a resumed or re-sharded job draws the same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from flexgen.errors import PromptError


class Sampling:
    """How the next token is chosen and when a sequence stops, with HF transformers' own pieces.

    The scores go through a ``LogitsProcessorList`` built as HF's ``generate`` builds it, in
    its order: ``RepetitionPenaltyLogitsProcessor`` (greedy too), then, when sampling,
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``. So each control
    means exactly what it means in HF, and greedy decoding with a repetition penalty gives HF's
    tokens. Only the draw itself is ours (:meth:`pick`): each row draws from its own
    counter-based stream, so that a prompt's tokens depend on the seed and that prompt alone,
    never on batching (HF's ``torch.multinomial`` draws from one generator for the whole batch).

    Stop strings are checked here too, per step, by HF's ``StopStringCriteria`` on the token
    ids (it precomputes, from the tokenizer's vocabulary, which tokens can end which string).
    Checking in the engine rather than on the decoded text afterwards lets a block end as soon
    as every sequence in it has stopped, exactly as stop token ids do, and the engine stays
    text-free: the tokenizer only goes into the criterion, built once per tokenizer and strings.
    """

    def __init__(self, do_sample: bool, processors: Any, stops: list[int], criterion: Any) -> None:
        self.do_sample = do_sample
        self.processors = processors  # a LogitsProcessorList, or None when there is nothing to do
        self.stops = stops
        self.criterion = criterion  # a StopStringCriteria, or None
        self.stops_early = bool(stops) or criterion is not None

    @classmethod
    def build(cls, do_sample: bool, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
              stop: int | Sequence[int] | None, stop_strings: str | Sequence[str] | None, tokenizer: Any,
              cache: dict[Any, Any]) -> "Sampling":
        """Check the controls (one-line :class:`PromptError` naming the setting) and build the processors."""
        if do_sample and not temperature > 0:
            raise PromptError(f"generation.temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise PromptError(f"generation.top_p must be in (0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise PromptError(f"generation.top_k must be an integer >= 0 (0: off), got {top_k!r}")
        if not repetition_penalty > 0:
            raise PromptError(f"generation.repetition_penalty must be > 0 (1.0: off), got {repetition_penalty}")
        stops = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if any(not isinstance(s, str) or not s for s in strings):
            raise PromptError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        processors = []
        if repetition_penalty != 1.0 or (do_sample and (temperature != 1.0 or top_k or top_p < 1)):
            from transformers import (
                RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
            )

            if repetition_penalty != 1.0:
                processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
            if do_sample and temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(temperature)))
            if do_sample and top_k:
                processors.append(TopKLogitsWarper(top_k))
            if do_sample and top_p < 1:
                processors.append(TopPLogitsWarper(float(top_p)))
        criterion = None
        if strings:
            if tokenizer is None:
                raise PromptError("stop strings need the tokenizer that decodes the ids: pass tokenizer=")
            key = (id(tokenizer), tuple(strings))
            if key not in cache:
                from transformers import StopStringCriteria

                cache.clear()  # one tokenizer and one set of strings at a time, in practice
                cache[key] = (tokenizer, StopStringCriteria(tokenizer, strings))
            criterion = cache[key][1]
        if processors:
            from transformers import LogitsProcessorList

            return cls(do_sample, LogitsProcessorList(processors), stops, criterion)
        return cls(do_sample, None, stops, criterion)

    def pick(self, logits: torch.Tensor, tokens: torch.Tensor, streams: Sequence[bytes], step: int) -> torch.Tensor:
        """Next token ids (B, 1) from the last position's logits (B, V) and each row's ``tokens`` so far.

        Greedy, or sampled: row r draws one uniform number from its own stream at this step
        (:func:`uniform`) and takes the token where it falls in the cumulative distribution
        (inverse transform sampling): what a row draws depends on nothing but its stream and
        the step.
        """
        scores = logits.float()
        if self.processors is not None:
            scores = self.processors(tokens, scores)
        if not self.do_sample:
            return scores.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.double().cumsum(dim=-1)
        u = torch.tensor([uniform(stream, step) for stream in streams], dtype=torch.float64, device=cdf.device)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        return token.clamp_(max=probs.shape[-1] - 1)

    def stopped(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows whose last token (``tokens[:, -1]``) is a stop token or ends a stop string."""
        last = tokens[:, -1]
        hit = torch.zeros_like(last, dtype=torch.bool)
        if self.stops:
            hit |= torch.isin(last, torch.tensor(self.stops, device=last.device))
        if self.criterion is not None:
            hit |= self.criterion(tokens, None).to(hit.device)
        return hit


def stream(seed: int, key: str, input_ids: Sequence[int]) -> bytes:
    """A prompt's random stream: a digest of the seed, its key and its token ids."""
    text = f"{seed}\0{key}\0{','.join(map(str, input_ids))}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest()


def uniform(stream: bytes, step: int) -> float:
    """The ``step``-th draw of a stream, uniform in [0, 1): 53 bits of a keyed digest (a counter-based generator)."""
    value = int.from_bytes(hashlib.blake2b(step.to_bytes(8, "little"), key=stream, digest_size=8).digest(), "little")
    return (value >> 11) / float(1 << 53)
