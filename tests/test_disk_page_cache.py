"""The disk tier keeps what fits of a model in the page cache and gives the rest back after use."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch

from flexgen import Policy, load_engine
from flexgen.errors import PluginError
from flexgen.registry import create
from flexgen.storage import disk as disk_module
from flexgen.storage.disk import DiskStorage

MIB = 1 << 20
PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11], [2, 99, 98]]


def _storage(tmp_path: Path, **options) -> DiskStorage:
    return DiskStorage(offload_dir=tmp_path / "offload", **options)


def test_weights_released_first_are_kept_until_the_budget_and_the_rest_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_module, "available_memory", lambda: 10 * MIB)
    dropped = []
    monkeypatch.setattr(disk_module, "drop_pages", lambda address, length, path, offset: dropped.append(path.name))
    storage = _storage(tmp_path, page_cache_fraction=0.25)  # a budget of 2.5 MiB: two of the four
    tensors = [storage.put(f"weights/m/w{i}", torch.full((MIB // 4,), float(i))) for i in range(4)]
    for _ in range(2):  # two steps, each using the layers in order
        for t in tensors:
            storage.release(storage.fetch(t, torch.device("cpu")))
    assert dropped == ["w2.safetensors", "w3.safetensors"] * 2
    assert storage.kept_bytes == 2 * MIB
    assert [t[0].item() for t in tensors] == [0.0, 1.0, 2.0, 3.0]
    storage.close()


def test_a_model_that_fits_keeps_everything(tmp_path, monkeypatch):
    dropped = []
    monkeypatch.setattr(disk_module, "drop_pages", lambda *args: dropped.append(args))
    storage = _storage(tmp_path)
    tensors = [storage.put(f"weights/m/w{i}", torch.ones(MIB // 4)) for i in range(3)]
    for t in tensors:
        storage.release(t)
    assert dropped == [] and storage.kept_bytes == 3 * MIB
    storage.close()


def test_scratch_tensors_and_slices_are_never_dropped(tmp_path, monkeypatch):
    dropped = []
    monkeypatch.setattr(disk_module, "drop_pages", lambda *args: dropped.append(args))
    storage = _storage(tmp_path, page_cache_fraction=0)
    cache = storage.empty("cache/k", (MIB // 4,), torch.float32)
    weight = storage.put("weights/m/w", torch.ones(MIB // 4))
    storage.release(cache)
    storage.release(weight[8:])
    assert dropped == []
    storage.release(weight)
    assert len(dropped) == 1
    storage.close()


def _resident_pages(tensor: torch.Tensor) -> float:
    """Share of the whole pages inside ``tensor`` that are in memory (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    address, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = ((address + length) // mmap.PAGESIZE * mmap.PAGESIZE - start) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(start, pages * mmap.PAGESIZE, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw) / pages


def _filesystem(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, fstype = line.split()[1], line.split()[2]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


@pytest.mark.skipif(not disk_module._CAN_DROP_PAGES or not Path("/proc/mounts").exists(), reason="Linux only")
def test_released_pages_leave_memory_and_read_the_same(tmp_path):
    if _filesystem(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_filesystem(tmp_path)}, whose pages cannot be dropped")
    storage = _storage(tmp_path, page_cache_fraction=0)
    values = torch.randn(4 * MIB // 4)
    weight = storage.put("weights/m/w", values)
    os.sync()  # pages still being written back stay in memory (as the kernel keeps dirty pages)
    storage.fetch(weight, torch.device("cpu"))  # brings every page in
    assert _resident_pages(weight) > 0.9
    storage.release(weight)
    assert _resident_pages(weight) < 0.1
    assert torch.equal(weight, values)  # read from the file again
    storage.close()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_a_bad_page_cache_fraction_is_named(tmp_path, bad):
    with pytest.raises(PluginError, match="plugins.storage.disk.*page_cache_fraction"):
        create("storage", {"name": "disk", "page_cache_fraction": bad}, where="plugins.storage.disk",
               offload_dir=tmp_path)


def test_engine_streaming_with_nothing_kept_generates_the_same_tokens(tiny_checkpoint, tmp_path, monkeypatch):
    released = []
    release = DiskStorage.release
    monkeypatch.setattr(DiskStorage, "release", lambda self, t: (released.append(t.data_ptr()), release(self, t)))
    path, _ = tiny_checkpoint
    with load_engine(path, policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path / "a") as engine:
        expected = engine.generate(PROMPTS, max_new_tokens=6)
    plugins = {"storage": {"disk": {"name": "disk", "page_cache_fraction": 0}}}
    with load_engine(path, policy=Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=0), plugins=plugins,
                     device="cpu", dtype="float32", offload_dir=tmp_path / "b") as engine:
        assert engine.generate(PROMPTS, max_new_tokens=6) == expected
        disk = engine.storage["disk"]
        assert disk.kept_bytes == 0
        weights = {part.data_ptr() for layer in engine.layers for placed in layer for part in placed.parts.values()}
        # every layer released in every step (6 steps, 2 blocks of 2 sequences)
        assert weights <= set(released) and len(released) >= 12 * len(weights)
