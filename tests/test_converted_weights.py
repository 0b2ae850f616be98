"""Converted weights are verified, and safetensors headers are checked, in every way they can break.

* a converted file whose bytes changed (one flipped byte, not only truncation), one swapped for
  another tensor's file (another shape, a valid checksum of its own), and one written by an
  older flexgen (no checksum) are each detected before use, converted again with a one-line
  notice, and the outputs stay HF's;
* a different checkpoint never reuses another's converted files, even with the same file names,
  sizes and modification times;
* every kind of malformed safetensors header is one CheckpointError naming the file, a hostile
  header length included (refused without reading it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flexgen import Policy, load_engine
from flexgen.errors import CheckpointError
from flexgen.models.checkpoint import HFCheckpoint
from flexgen.storage.disk import DiskStorage, read_header
from flexgen.testing.reference import hf_greedy
from tests.conftest import make_checkpoint

PROMPTS = [[2, 15, 16, 17], [2, 40], [2, 7, 8, 9, 10, 11]]
DISK = Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=0)


def generate(path, offload):
    with load_engine(path, policy=DISK, device="cpu", dtype="float32", offload_dir=offload) as engine:
        return engine.generate(PROMPTS, max_new_tokens=4)


def converted(offload: Path, name: str) -> Path:
    (found,) = offload.rglob(f"{name}.data.safetensors")
    return found


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "swapped file", "no checksum"])
def test_damaged_converted_file_is_converted_again(tiny_checkpoint, tmp_path, caplog, damage):
    path, model = tiny_checkpoint
    expected = hf_greedy(model, PROMPTS, 4)
    assert generate(path, tmp_path) == expected
    victim = converted(tmp_path, "layers.0.fc1.weight")
    if damage == "flipped byte":
        flip_last_byte(victim)
        reason = "is damaged"
    elif damage == "swapped file":
        shutil.copyfile(converted(tmp_path, "layers.1.fc2.weight"), victim)  # (64, 128) where (128, 64) belongs
        reason = "holds 'weights/"
    else:
        save_file({"data": torch.zeros(128, 64)}, str(victim))  # right shape, no flexgen metadata
        reason = "carries no checksum"
    with caplog.at_level(logging.WARNING, logger="flexgen"):
        assert generate(path, tmp_path) == expected
    notices = [r.getMessage() for r in caplog.records if "converting it again" in r.getMessage()]
    assert len(notices) == 1 and reason in notices[0] and victim.name in notices[0] and "\n" not in notices[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexgen"):
        assert generate(path, tmp_path) == expected  # converted again: clean now
    assert not [r for r in caplog.records if "converting it again" in r.getMessage()]


def test_another_checkpoint_never_reuses_converted_files(tmp_path):
    """Same folder path, file names, sizes and modification times; other weights."""
    ckpt, offload = tmp_path / "ckpt", tmp_path / "offload"
    make_checkpoint(ckpt, "pre_ln", seed=0)
    stamps = {f.name: (f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in ckpt.iterdir()}
    first = HFCheckpoint(ckpt).fingerprint()
    generate(ckpt, offload)
    model = make_checkpoint(ckpt, "pre_ln", seed=1)
    for f in ckpt.iterdir():
        os.utime(f, ns=stamps[f.name])
    assert {f.name: f.stat().st_mtime_ns for f in ckpt.iterdir()} == {k: v[1] for k, v in stamps.items()}
    assert HFCheckpoint(ckpt).fingerprint() != first
    assert generate(ckpt, offload) == hf_greedy(model, PROMPTS, 4)


def test_a_moved_checkpoint_is_the_same_model_but_not_the_same_conversion(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    a, b = HFCheckpoint(path), HFCheckpoint(copy)
    assert a.content_fingerprint() == b.content_fingerprint()  # a resume may follow the model
    assert a.fingerprint() != b.fingerprint()  # converted copies are bound to the folder


# --------------------------------------------------------------------------- headers


def write_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("header, data, fault", [
    (GOOD, b"\0" * 16, None),
    ([1, 2], b"", "not an object"),
    (b"\xff\xfe not utf-8", b"", "not UTF-8 JSON"),
    (b"{not json", b"", "not UTF-8 JSON"),
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16, "offsets span 16"),
    ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype 'F8_E4M3'"),
    ({"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, "not a list of non-negative"),
    ({"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, b"\0" * 16, "not a list of non-negative"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, b"\0" * 16, "not a pair"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}}, b"\0" * 16, "not a pair"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16, "not a pair"),
    ({"w": [1, 2]}, b"", "is not an object"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "header says"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 20, "header says"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "a hole or an overlap"),
    ({"__metadata__": {"k": 1}, **GOOD}, b"\0" * 16, "__metadata__"),
])
def test_malformed_headers_are_one_line(tmp_path, header, data, fault):
    path = write_raw(tmp_path / "w.safetensors", header, data)
    if fault is None:
        assert read_header(path).tensors["w"][1] == (2, 2)
        return
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message and fault in message and "\n" not in message


def test_hostile_header_length_is_refused_without_reading(tmp_path, monkeypatch):
    # 200 MB of holes claiming a 150 MB header: refused by the length alone.
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(200_000_000)
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    with pytest.raises(CheckpointError, match="more than safetensors allows"):
        read_header(sparse)
    monkeypatch.undo()
    assert reads == [8]  # the length, nothing more
    tiny = write_raw(tmp_path / "tiny.safetensors", GOOD, length=1 << 40)
    with pytest.raises(CheckpointError, match="claims 1099511627776 bytes"):
        read_header(tiny)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte header length"):
        read_header(short)


def test_a_damaged_checkpoint_shard_is_named_before_anything_is_converted(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated or corrupt safetensors file .*{name}"):
        HFCheckpoint(broken)
    assert not (tmp_path / "offload").exists()


def test_disk_tier_errors_name_the_offload_folder(tmp_path):
    from flexgen.errors import StorageError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="output.offload_dir: .*file is not a folder"):
        DiskStorage(offload_dir=tmp_path / "file")
    disk = DiskStorage(offload_dir=tmp_path / "file2")
    (tmp_path / "file2").write_text("")  # the folder replaced by a file after the tier opened
    with pytest.raises(StorageError, match="output.offload_dir: cannot write"):
        disk.put("weights/x/a", torch.ones(3))


@pytest.mark.parametrize("reopened", [False, True], ids=["just-written", "mapped-by-a-later-run"])
def test_a_cpu_fetch_asks_for_the_tensors_own_bytes_ahead(tmp_path, monkeypatch, reopened):
    """On the CPU a disk fetch brings the tensor's file range in before compute touches it
    (DiskStorage._bring_in): the range asked of the kernel is exactly where its bytes lie."""
    tensor = torch.arange(3000, dtype=torch.float32).reshape(30, 100).to(torch.bfloat16)
    disk = DiskStorage(offload_dir=tmp_path)
    resident = disk.put("decoder.layers.0.w", tensor)
    if reopened:
        disk.close()
        disk = DiskStorage(offload_dir=tmp_path)
        resident = disk.get("decoder.layers.0.w")
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append((offset, length, advice)),
                        raising=False)
    assert torch.equal(disk.fetch(resident, torch.device("cpu")), tensor)
    [(offset, length, advice)] = advised
    assert advice == getattr(os, "POSIX_FADV_WILLNEED", advice)
    with open(tmp_path / "decoder.layers.0.w.safetensors", "rb") as file:
        file.seek(offset)
        assert file.read(length) == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    disk.close()
