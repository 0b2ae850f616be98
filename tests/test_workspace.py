"""Workspace: reused buffers, grown on demand, per thread, never pickled."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from flexgen.attention.cpu import CPUAttention
from flexgen.workspace import Workspace


def test_views_reuse_one_buffer_until_a_larger_request() -> None:
    ws = Workspace()
    a = ws.empty("x", (4, 8), torch.float32, "cpu")
    b = ws.empty("x", (2, 3), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() and ws.nbytes() == 4 * 8 * 4
    c = ws.empty("x", (100,), torch.float32, "cpu")
    assert c.numel() == 100 and ws.nbytes() == 400
    assert ws.empty("x", (10,), torch.float16, "cpu").dtype == torch.float16  # another buffer
    assert ws.nbytes() == 400 + 20


def test_empty_like_layout_follows_the_source_memory_order() -> None:
    cache = torch.zeros(9, 3, 2, 16)  # (T, B, H, D)
    view = cache[2:7].permute(1, 2, 0, 3)  # (B, H, t, D)
    out = Workspace().empty_like_layout("block", view, torch.float32)
    assert out.shape == view.shape
    assert out.permute(2, 0, 1, 3).is_contiguous()  # laid out (t, B, H, D), like the cache


def test_each_thread_has_its_own_buffers() -> None:
    ws = Workspace()
    here = ws.empty("x", (16,), torch.float32, "cpu").data_ptr()
    there = []
    thread = threading.Thread(target=lambda: there.append(ws.empty("x", (16,), torch.float32, "cpu").data_ptr()))
    thread.start()
    thread.join()
    assert there[0] != here


def test_backends_with_workspaces_pickle_and_copy() -> None:
    attention = CPUAttention(block_kib=64)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 5, 8).half()
    expected = attention.decode(q, k, v, None)
    for clone in (pickle.loads(pickle.dumps(attention)), copy.deepcopy(attention)):
        assert clone.workspace.nbytes() == 0 and clone.block_bytes == attention.block_bytes
        assert torch.equal(clone.decode(q, k, v, None), expected)
