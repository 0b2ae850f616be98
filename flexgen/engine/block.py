"""The state of one block between the tasks of a step: its GPU batches and where their tensors are.

A block is ``num_gpu_batches × gpu_batch_size`` sequences generated together. Each GPU batch
carries its prompt ids and validity mask, its hidden states between tasks (resident in its
activation tier), a host attention still running for it, and the tokens it has produced.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from flexgen.engine.kv_cache import CacheUnit
from flexgen.engine.sampling import Sampling
from flexgen.scheduling.base import Task


@dataclass
class HostAttention:
    """A decode attention running on the host worker for one GPU batch.

    It is finished (the output projection issued on the compute device) when the batch is
    next used, so the GPU meanwhile computes the other batches' work.
    """

    future: Future  # -> the attention output (B, H, 1, D) on the host
    x: torch.Tensor  # the attention layer's input: the residual
    weights: dict[str, torch.Tensor]  # the attention layer's weights, for the output projection


@dataclass
class GPUBatch:
    """The state of one GPU batch of a block between tasks."""

    prompt_ids: torch.Tensor  # (B, n) left-padded, on the compute device
    valid: torch.Tensor  # (B, T) bool: real tokens so far and to come
    valid_host: torch.Tensor  # the same, on the host (CPU attention reads it with no device wait)
    prompt_ids_host: torch.Tensor  # prompt_ids on the host (embedding rows gathered there)
    padded: bool  # some sequence is shorter than the block's prompt: attention needs a mask
    next_ids: torch.Tensor | None = None  # (B, 1) the tokens to embed in this step
    hidden: torch.Tensor | None = None  # resident in the batch's activation tier
    pending: HostAttention | None = None  # hidden states still being computed on the host
    positions: torch.Tensor | None = None  # (B, n) this step's position ids, set by the embedding
    outputs: list[torch.Tensor] = field(default_factory=list)
    #: (B, prompt + new tokens) each row's tokens so far, on the compute device: what repetition
    #: penalty and stop strings look at. A row's left padding holds its own first token, so a
    #: row's set of tokens is its prompt's and its outputs', whatever the padding.
    tokens: torch.Tensor | None = None


@dataclass
class Block:
    """One block being generated: its GPU batches and where their tensors live."""

    batches: list[GPUBatch]
    prompt_len: int
    act_tiers: list[str]  # home tier of each GPU batch's hidden states
    cache: list[list[CacheUnit]]  # [decoder layer][GPU batch]
    sampling: Sampling
    streams: list[bytes]  # each row's random stream (see Sampling.pick)


def next_layers(tasks: list[Task]) -> list[int | None]:
    """For each task, the layer of the first later task on another layer (None at the end):
    the layer whose weights to start loading while this task computes."""
    ahead: list[int | None] = [None] * len(tasks)
    following = None
    for t in range(len(tasks) - 2, -1, -1):
        if tasks[t + 1].layer != tasks[t].layer:
            following = tasks[t + 1].layer
        ahead[t] = following
    return ahead
