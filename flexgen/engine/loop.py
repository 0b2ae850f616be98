"""The step loop: where the rooms of the engine meet, read top to bottom.

One ``generate`` call cuts the prompts into *blocks* of ``num_gpu_batches × gpu_batch_size``
sequences. For each block, each step (the prefill, then one token at a time) is a list of
tasks (model layer j, GPU batch k) in the order the Scheduler gives. Moving data overlaps
computing it: the next layer's weights start loading when the current layer starts (once per
layer and step under zig-zag), and while task t computes, the cache I/O thread fetches what
task t+1 needs besides weights: the cache prefix of its (layer, batch) when attention runs
away from the cache's home, and its hidden states when they live in another tier. The host
waits only for the layer before the current one before asking for the next layer's weights,
which bounds the weights in compute memory to three layers.

The rooms: :mod:`~flexgen.engine.placement` (where weights live, and loading a layer),
:mod:`~flexgen.engine.transfers` (threads, streams, events, bytes per link),
:mod:`~flexgen.engine.kv_cache` (the cache's units, layout, reads and writes),
:mod:`~flexgen.engine.attend` (where attention runs), :mod:`~flexgen.engine.sampling`
(the next token) and :mod:`~flexgen.engine.block` (a block's state between tasks). The
engine talks to storage, compression, attention and the model only through their
interfaces.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flexgen import registry
from flexgen.dtypes import compute_dtype
from flexgen.engine.attend import DecodeAttention
from flexgen.engine.block import Block, GPUBatch, HostAttention, next_layers
from flexgen.engine.kv_cache import KVCache
from flexgen.engine.placement import PlacedWeight, WeightPlacement
from flexgen.engine.sampling import Sampling, stream
from flexgen.engine.sizes import numel
from flexgen.engine.stats import EngineStats
from flexgen.engine.transfers import Transfers
from flexgen.errors import FlexGenError, PluginError, PromptError
from flexgen.linear import describe as describe_cpu_products
from flexgen.models.checkpoint import WeightSource
from flexgen.models.families import family_for_spec
from flexgen.policy import TIERS, Policy, split_by_percent
from flexgen.scheduling.base import Task
from flexgen.threads import ThreadGovernor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DEFAULT_PLUGINS: dict[str, Any] = {
    "storage": {"gpu": "gpu", "cpu": "cpu", "disk": "disk"},
    "attention": "gpu",
    "weight_compressor": "none",
    "cache_compressor": "none",
    "scheduler": "zigzag",
}


class Engine:
    """Generates with a model of any family (OPT, Llama, ...) whose tensors are spread over tiers by a Policy.

    The model's mathematics comes from its :class:`~flexgen.models.family.ModelFamily`; the
    engine knows only the shared cut into model layers ``[embed, attn 0, mlp 0, ..., head]``.
    """

    def __init__(
        self,
        source: WeightSource,
        policy: Policy,
        plugins: Mapping[str, Any],
        device: torch.device,
        offload_dir: Path,
        dtype: torch.dtype,
        progress: Callable[[int, int, int], None] | None = None,
        threads: int | None = None,
    ) -> None:
        """``progress(layers placed, layers, tensors converted)`` is called as each model layer's
        weights are placed (from this thread), so a caller can show how a long load goes.
        ``threads``: intra-op threads to compute with (None: decided by :mod:`flexgen.threads`)."""
        self.spec = source.spec
        #: The model's mathematics: every layer is computed through it, never by a family's name.
        self.family = family_for_spec(self.spec)
        self.policy = policy
        self.device = device = resolve_device(device)
        self.dtype = dtype
        #: What the products run in: the model's dtype, except on a CPU without native
        #: instructions for it, where half precision is computed in float32 (flexgen/dtypes.py).
        #: Compute memory (gpu-tier weights, the KV cache, activations) holds this dtype; the cpu
        #: and disk tiers hold weights in the model's dtype, converted as each layer is used.
        self.compute_dtype = DTYPES[compute_dtype(str(dtype).removeprefix("torch."), device)]
        self.offload_dir = offload_dir
        self.plugins = {**DEFAULT_PLUGINS, **{k: v for k, v in plugins.items() if v is not None}}
        unknown = sorted(set(self.plugins) - set(DEFAULT_PLUGINS))
        if unknown:
            raise PluginError(f"unknown plugins key {unknown[0]!r}; keys: {', '.join(DEFAULT_PLUGINS)}")
        self.stats = EngineStats(dtype=str(dtype).removeprefix("torch."),
                                 compute_dtype=str(self.compute_dtype).removeprefix("torch."))
        if device.type == "cpu" and self.compute_dtype == torch.float32:
            self.stats.cpu_products = describe_cpu_products()  # builds the few-row kernel on first use

        storage_specs = {**DEFAULT_PLUGINS["storage"], **dict(self.plugins["storage"])}
        self.storage = {
            tier: registry.create(
                "storage", storage_specs[tier], where=f"plugins.storage.{tier}",
                compute_device=device, offload_dir=offload_dir, pin_memory=policy.pin_weights,
            )
            for tier in TIERS
        }
        self.attention = registry.create("attention", self.plugins["attention"], where="plugins.attention")
        self.weight_compressor = registry.create(
            "compressor", self.plugins["weight_compressor"], where="plugins.weight_compressor"
        )
        self.cache_compressor = registry.create(
            "compressor", self.plugins["cache_compressor"], where="plugins.cache_compressor"
        )
        self.scheduler = registry.create("scheduler", self.plugins["scheduler"], where="plugins.scheduler")
        self.attention_device = self.attention.device(device)
        # asked now, so that the built-in backends build their CPU kernel here, not inside the
        # first decode step
        self.stats.attention_kernel = self.attention.describe(self.attention_device, self.compute_dtype)
        self._cuda = device.type == "cuda"
        self._run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop_string_criteria: dict[Any, Any] = {}  # see Sampling.build

        self.transfers = Transfers(self.storage, device, policy, self.stats)
        self.placement = WeightPlacement(
            self.family, self.spec, policy, self.storage, self.weight_compressor,
            repr(registry.parse_spec(self.plugins["weight_compressor"], "plugins.weight_compressor")),
            device, dtype, self.compute_dtype, self.transfers, self.stats, progress,
        )
        self.cache = KVCache(self.family, self.spec, policy, self.storage, self.cache_compressor, self.attention,
                             self.attention_device, self.placement.tier_location, self.compute_dtype,
                             self.transfers, self.stats, self._run_id)
        self.attend = DecodeAttention(self.attention, self.attention_device, device, self.cache, self.transfers)
        #: Decode attention on the host runs on its own worker thread, so the main thread goes
        #: on issuing the other GPU batches' work while it runs (CPU delegation beside GPU
        #: work). On by default where that pays: a GPU computes and attention runs on the host.
        #: Tests turn it on to run this path on a machine without CUDA.
        self.host_attention_on_worker = self._cuda and policy.overlap and self.attention_device.type == "cpu"
        #: Intra-op threads (flexgen/threads.py): on the CPU decided from the cores, their load
        #: and the work (the largest product of a decode step: the first MLP matrix); on CUDA
        #: only an explicit setting is applied, torch's own is kept otherwise.
        work = 2 * policy.gpu_batch_size * self._largest_mlp_matrix()
        self._threads = (ThreadGovernor(threads, work if not self._cuda else None)
                         if not self._cuda or threads is not None else None)

        self.placement.place(source)
        self._note_memory()

    def _largest_mlp_matrix(self) -> int:
        """Elements of the largest matrix of the first MLP layer (its family's weight specs)."""
        for index in range(self.spec.num_model_layers):
            if self.family.layer_kind(self.spec, index)[0] == "mlp":
                return max((numel(w.shape) for w in self.family.layer_weights(self.spec, index) if len(w.shape) == 2),
                           default=0)
        return 0

    @property
    def layers(self) -> list[list[PlacedWeight]]:
        """Each model layer's weights, placed (see :class:`~flexgen.engine.placement.PlacedWeight`)."""
        return self.placement.layers

    @property
    def converted_weights(self) -> int:
        """Tensors this engine converted into a persistent tier (the disk's offload folder)."""
        return self.placement.converted_weights

    def _note_memory(self) -> None:
        for tier, backend in self.storage.items():
            self.stats.peak_memory[tier] = max(self.stats.peak_memory[tier], backend.nbytes())
        if self._cuda:
            self.stats.peak_memory["gpu"] = max(
                self.stats.peak_memory["gpu"], torch.cuda.max_memory_allocated(self.device)
            )

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        input_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: int | Sequence[int] | None = None,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        return_finish_reasons: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], list[str]]:
        """New tokens for every prompt, in order; a sequence ends after a ``stop`` token or a stop string.

        The controls mean what they mean in HF transformers' ``generate``, whose logits
        processors compute them (:class:`~flexgen.engine.sampling.Sampling`): ``repetition_penalty``
        (greedy too), ``temperature``, ``top_k`` (0: off) and ``top_p`` (with ``do_sample``), and
        ``stop_strings`` with the ``tokenizer`` that decodes the ids (HF's ``StopStringCriteria``).
        A sequence's output ends with the token that stopped it.

        With ``do_sample``, each prompt samples from its own random stream, drawn from ``seed``,
        its key (``keys[i]``; default its index ``i``) and its token ids: its tokens do not depend
        on the block size, on the other prompts or on their order.

        ``return_finish_reasons``: also return, per prompt, ``"stop"`` (a stop token or string
        ended it) or ``"length"`` (``max_new_tokens`` reached), the names vLLM and the OpenAI API use.
        """
        prompts = self._check_prompts(input_ids, max_new_tokens)
        if keys is None:
            keys = [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise PromptError(f"keys: {len(keys)} keys for {len(prompts)} prompts")
        sampling = Sampling.build(do_sample, temperature, top_p, top_k, repetition_penalty, stop, stop_strings,
                                  tokenizer, self._stop_string_criteria)
        outputs: list[list[int]] = []
        reasons: list[str] = []
        block_size = self.policy.block_size
        with torch.inference_mode(), self._threads_applied():
            for start in range(0, len(prompts), block_size):
                real = prompts[start:start + block_size]
                padded = real + [real[0]] * (block_size - len(real))  # outputs of padding are dropped
                streams = [stream(seed or 0, str(key), ids) for key, ids in zip(keys[start:start + block_size], real)]
                streams += [streams[0]] * (block_size - len(real))
                tokens, why = self._generate_block(padded, max_new_tokens, sampling, streams, len(real))
                outputs.extend(tokens[: len(real)])
                reasons.extend(why[: len(real)])
        return (outputs, reasons) if return_finish_reasons else outputs

    def _threads_applied(self):
        """The engine's thread setting while it generates; the caller's is given back afterwards."""
        return self._threads.applied() if self._threads is not None else contextlib.nullcontext()

    def _update_threads(self) -> None:
        """Between steps: decide the thread count again when the machine's load may have changed."""
        if self._threads is not None:
            self.stats.threads = self._threads.update().to_dict()

    def _check_prompts(self, input_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PromptError(f"generation.max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.tolist()
        if isinstance(input_ids, str) or any(isinstance(ids, str) for ids in input_ids):
            raise PromptError(
                "engine.generate takes token ids (a list of lists of ints), not text: tokenise the prompts first, "
                "or use flexgen.batch_generate(config, ['text', ...]), which tokenises them with the model's tokenizer"
            )
        prompts = []
        vocab, limit = self.spec.vocab_size, self.spec.max_positions
        for i, ids in enumerate(input_ids):
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            if not ids:
                raise PromptError(f"prompt {i} is empty")
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise PromptError(f"prompt {i}: token id {bad!r} is outside the vocabulary [0, {vocab})")
            if len(ids) + max_new_tokens > limit + 1:  # the last new token needs no position (as in HF)
                raise PromptError(
                    f"prompt {i}: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                    f"{limit} positions (+1 for the last new token)"
                )
            prompts.append(ids)
        return prompts

    def _generate_block(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
        streams: list[bytes], num_real: int,
    ) -> tuple[list[list[int]], list[str]]:
        """Every row's new tokens (cut after the token that stopped it) and finish reason."""
        B, K = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        prompt_len = max(map(len, prompts))
        total = prompt_len + max_new_tokens
        batches = []
        for k in range(K):
            rows = prompts[k * B:(k + 1) * B]
            ids = torch.full((B, prompt_len), self.spec.pad_token_id, dtype=torch.long)
            valid = torch.zeros((B, total), dtype=torch.bool)
            tokens = torch.zeros((B, total), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, prompt_len - len(row):] = torch.tensor(row)
                valid[r, prompt_len - len(row):] = True
                tokens[r, :prompt_len] = ids[r]
                tokens[r, : prompt_len - len(row)] = row[0]  # see GPUBatch.tokens
            padded = any(len(row) < prompt_len for row in rows)
            batches.append(GPUBatch(ids.to(self.device), valid.to(self.device), valid, ids, padded,
                                    tokens=tokens.to(self.device)))
        block = Block(batches, prompt_len, split_by_percent([1] * K, self.policy.percents("act")),
                      self.cache.for_length(total), sampling, streams)
        done = torch.zeros(B * K, dtype=torch.bool, device=self.device)
        kept = torch.full((B * K,), max_new_tokens, dtype=torch.long, device=self.device)  # tokens each row keeps
        try:
            self.transfers.sync()
            started = time.perf_counter()
            for step in range(max_new_tokens):
                self._update_threads()
                self._run_step(block, step)
                if sampling.stops_early:
                    stopped = torch.cat([sampling.stopped(b.tokens[:, : prompt_len + step + 1]) for b in batches])
                    kept = torch.where(stopped & ~done, step + 1, kept)
                    done |= stopped
                if step == 0:
                    self.transfers.sync()
                    prefill_end = time.perf_counter()
                    self.stats.prefill_time_s += prefill_end - started
                if sampling.stops_early and bool(done[:num_real].all()):
                    break
            self.transfers.sync()
            self.stats.decode_time_s += time.perf_counter() - prefill_end
        finally:
            # On an error, work handed to the worker threads and the device may still read the
            # cache and the batches' tensors: let it finish before they are reused or freed.
            for batch in batches:
                batch.pending = None
            self.transfers.drain(self.attend.worker)
            self.transfers.sync()
            self._note_memory()
            for k, tier in enumerate(block.act_tiers):
                self.storage[tier].free(self._act_key(k))
        tokens = torch.cat([torch.cat(b.outputs, dim=1) for b in batches]).tolist()
        results = [row[:n] for row, n in zip(tokens, kept.tolist())]
        reasons = ["stop" if d else "length" for d in done.tolist()]
        self.stats.prompt_tokens += sum(len(p) for p in prompts[:num_real])
        self.stats.generated_tokens += sum(len(r) for r in results[:num_real])
        return results, reasons

    def _act_key(self, batch: int) -> str:
        return f"act/{self._run_id}/{batch}"

    def _run_step(self, block: Block, step: int) -> None:
        """One step (prefill when ``step == 0``) of a block, in the scheduler's order."""
        tasks = self.scheduler.order(self.spec.num_model_layers, len(block.batches))
        # Tokens in the cache before this step: the prompt, then one more per decode step.
        length = block.prompt_len if step == 0 else block.prompt_len + step - 1
        # Weights: the next layer in the order starts loading as soon as the current one
        # starts computing, so it has the whole layer (every GPU batch) to arrive in.
        loads = {tasks[0].layer: self.placement.submit_layer(tasks[0].layer)}
        previous_layer_done = None  # compute-stream event: the layer before the current one is computed
        finished = None  # the last layer done with: released once the next is done too (a host
        # attention of an attention layer is finished, with that layer's weights, in the next)
        pending = self._prefetch(block, tasks[0], None, step, length)
        for t, (task, ahead) in enumerate(zip(tasks, next_layers(tasks))):
            hidden_f, cache_f = pending
            following = tasks[t + 1] if t + 1 < len(tasks) else None
            if following is not None:
                # Issue the next task's I/O before computing this one, so the two overlap.
                pending = self._prefetch(block, following, task, step, length)
            batch = block.batches[task.batch]
            weights = self.placement.ready(self.transfers.wait(loads[task.layer]))
            x = self.transfers.wait(hidden_f) if hidden_f is not None else self._hidden(batch)
            prefix = (self.transfers.wait(cache_f, on_host=self.attention_device.type == "cpu")
                      if cache_f is not None else None)
            out = self._compute(block, task, step, length, weights, x, prefix)
            if ahead is not None and ahead not in loads:
                # At most three layers' weights in compute memory (the one finishing, this one,
                # the next): the host may not run further ahead of the device than that, or
                # buffers freed on the host but still in use on the device pile up.
                if previous_layer_done is not None:
                    previous_layer_done.synchronize()
                loads[ahead] = self.placement.submit_layer(ahead)
            if following is None or following.layer != task.layer:
                del loads[task.layer]  # done with this layer: its buffers go once computed
                previous_layer_done = self.transfers.compute_event()
                if finished is not None:
                    self.placement.release_layer(finished)
                finished = task.layer
            if batch.pending is not None:
                continue  # its hidden states arrive when the host attention is finished
            if task.layer == self.spec.num_model_layers - 1:
                batch.hidden = None
            elif (following is not None and following.batch == task.batch) or block.act_tiers[task.batch] == "gpu":
                batch.hidden = out  # already where it is used next: no copy
            else:
                batch.hidden = self.transfers.put(block.act_tiers[task.batch], self._act_key(task.batch), out)
        if finished is not None:
            self.placement.release_layer(finished)

    def _prefetch(self, block: Block, task: Task, previous: Task | None, step: int,
                  length: int) -> tuple[Future | None, Future | None]:
        """Start loading what ``task`` needs besides weights: its hidden states and cache prefix.

        Hidden states are fetched only when they were stored away (another batch ran in
        between and their home is not compute memory); the cache prefix only in decode, and
        only when attention runs away from the cache's home.
        """
        hidden = None
        tier = block.act_tiers[task.batch]
        if task.layer > 0 and tier != "gpu" and (previous is None or previous.batch != task.batch):
            resident = block.batches[task.batch].hidden
            hidden = self.transfers.load_written(self.transfers.fetch, tier, resident, self.device)
        prefix = None
        kind, layer = self.family.layer_kind(self.spec, task.layer)
        if kind == "attn" and step > 0:
            unit = block.cache[layer][task.batch]
            if not self.cache.resident_where_attended(unit):
                # Only the positions the new token will attend to: all of them, or its sliding window.
                start = self.cache.window_start(layer, length + 1)
                prefix = self.transfers.load_written(self.cache.read, unit, length, self.attention_device, start)
        return hidden, prefix

    def _compute(self, block: Block, task: Task, step: int, length: int, weights: dict[str, torch.Tensor],
                 x: torch.Tensor | None, prefix) -> torch.Tensor | None:
        """Run one model layer for one GPU batch; returns its hidden states (None after the head,
        and None while a host attention computes them: ``batch.pending``)."""
        spec, family, batch = self.spec, self.family, block.batches[task.batch]
        kind, layer = family.layer_kind(spec, task.layer)
        prefill = step == 0
        if kind == "embed":
            return self._embed(batch, prefill, length, weights)
        if kind == "mlp":
            return family.mlp(spec, weights, x)
        if kind == "head":
            logits = self.placement.logits(weights, x)
            B = self.policy.gpu_batch_size
            position = block.prompt_len + step
            token = block.sampling.pick(logits, batch.tokens[:, :position],
                                        block.streams[task.batch * B:(task.batch + 1) * B], step)
            batch.tokens[:, position] = token[:, 0]
            batch.outputs.append(token)
            batch.next_ids = token
            return None
        q, k, v = family.attention_in(spec, weights, x, batch.positions)
        unit = block.cache[layer][task.batch]
        if prefill:
            attn = self.attend.prefill(unit, batch, length, q, k, v, layer)
        elif (self.host_attention_on_worker and self.cache.resident_where_attended(unit)
              and block.act_tiers[task.batch] == "gpu"):
            batch.pending = HostAttention(self.attend.start_on_host(unit, batch, length, q, k, v, layer), x, weights)
            return None
        else:
            attn = self.attend.decode(unit, batch, length, q, k, v, prefix, layer)
        return family.attention_out(spec, weights, x, attn)

    def _embed(self, batch: GPUBatch, prefill: bool, length: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The embedding of this step's tokens; rows of tables that live off compute memory are gathered at home."""
        ids = batch.prompt_ids if prefill else batch.next_ids
        n = ids.shape[1]
        family, seen = self.family, length + (0 if prefill else 1)
        # This step's positions on the compute device, kept for the attention layers of the
        # step (a rotary family rotates queries and keys by them in attention_in).
        batch.positions = family.positions(batch.valid[:, :seen])[:, -n:]
        gathered = self.placement.gathered
        if not gathered:
            return family.embed(self.spec, weights, ids, batch.positions)
        # The row indices on the host: the prompt's are there already, a decoded token is
        # copied back from the device (a few bytes, once the sampler has produced it).
        host_ids = batch.prompt_ids_host if prefill else ids.cpu()
        positions = family.positions(batch.valid_host[:, :seen])[:, -n:]
        rows = {}
        for name, index in family.embedding_rows(self.spec, host_ids, positions).items():
            placed = gathered.get(name)
            rows[name] = (self.placement.gather_rows(placed, index) if placed is not None
                          else F.embedding(index.to(self.device), weights[name]))
        return family.embed_rows(self.spec, weights, rows)

    def _hidden(self, batch: GPUBatch) -> torch.Tensor | None:
        """The batch's hidden states, finishing its host attention first when one is pending."""
        pending = batch.pending
        if pending is not None:
            batch.pending = None
            attn = pending.future.result().to(self.device, non_blocking=True)
            batch.hidden = self.family.attention_out(self.spec, pending.weights, pending.x, attn)
        return batch.hidden

    def close(self) -> None:
        """Release caches, buffers and scratch files; converted disk weights stay for reuse."""
        self.transfers.close()
        self.attend.close()
        self.transfers.sync()  # no copy may still read or write what is freed below
        self.cache.free()
        for backend in self.storage.values():
            backend.close()
        self.placement.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexGenError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        # With an index, the device compares equal to the .device of the tensors made there.
        device = torch.device("cuda", torch.cuda.current_device())
    return device
