"""Greedy outputs identical to HF transformers, for every placement, schedule and backend.

float32 on the CPU; three checkpoint variants; prompts of unequal length; more prompts than
one block holds, so blocks are cut and the last one padded.
"""

from __future__ import annotations

import itertools

import pytest

from flexgen import Policy, load_engine
from flexgen.testing.reference import hf_greedy
from tests.conftest import CHECKPOINT_VARIANTS, make_checkpoint

PROMPTS = [[2, 15, 16, 17, 18, 19], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14], [2, 99], [2, 50, 51, 52, 53]]
NEW_TOKENS = 6

PLACEMENTS = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0), "mix": (30, 30)}
COMBOS = list(itertools.product(PLACEMENTS, PLACEMENTS, ["gpu", "cpu"], ["zigzag", "row"], [1, 3]))


@pytest.fixture(scope="module", params=list(CHECKPOINT_VARIANTS))
def reference(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    model = make_checkpoint(path, request.param)
    return path, hf_greedy(model, PROMPTS, NEW_TOKENS), tmp_path_factory.mktemp("offload")


@pytest.mark.parametrize("weights,cache,attention,scheduler,num_gpu_batches", COMBOS)
def test_greedy_equals_hf(reference, weights, cache, attention, scheduler, num_gpu_batches):
    path, expected, offload = reference
    policy = Policy(
        gpu_batch_size=2, num_gpu_batches=num_gpu_batches,
        weights_gpu=PLACEMENTS[weights][0], weights_cpu=PLACEMENTS[weights][1],
        cache_gpu=PLACEMENTS[cache][0], cache_cpu=PLACEMENTS[cache][1],
        # activations follow the cache's placement, so they travel through every tier too
        act_gpu=PLACEMENTS[cache][0], act_cpu=PLACEMENTS[cache][1],
    )
    with load_engine(path, policy=policy, plugins={"attention": attention, "scheduler": scheduler},
                     device="cpu", dtype="float32", offload_dir=offload) as engine:
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == expected


@pytest.mark.parametrize("weights,cache,scheduler,num_gpu_batches",
                         list(itertools.product(PLACEMENTS, PLACEMENTS, ["zigzag", "row"], [1, 3])))
def test_host_attention_on_its_worker_equals_hf(reference, weights, cache, scheduler, num_gpu_batches):
    """CPU delegation with decode attention on the attention worker, as on a GPU machine, while
    the main thread goes on with the other batches: here the compute device is the CPU too."""
    path, expected, offload = reference
    policy = Policy(
        gpu_batch_size=2, num_gpu_batches=num_gpu_batches,
        weights_gpu=PLACEMENTS[weights][0], weights_cpu=PLACEMENTS[weights][1],
        cache_gpu=PLACEMENTS[cache][0], cache_cpu=PLACEMENTS[cache][1],
    )
    with load_engine(path, policy=policy, plugins={"attention": "cpu", "scheduler": scheduler},
                     device="cpu", dtype="float32", offload_dir=offload) as engine:
        engine.host_attention_on_worker = True
        started = []
        start = engine.attend.start_on_host
        engine.attend.start_on_host = lambda *args: started.append(1) or start(*args)
        assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == expected
    assert started, "no decode attention ran on the worker"
