"""Nothing is leaked: scratch of killed runs is removed by the next run, never a live run's.

* :mod:`flexgen.scratch` on its own: a folder whose owner holds its lock survives a sweep; once
  the owner is killed (SIGKILL: no cleanup at all), the next sweep removes it;
* the disk tier: the KV-cache scratch and a conversion's temporary file of a process killed
  mid-run are removed when the next process opens a disk tier on the same offload folder;
* the quickstart: a half-built checkpoint folder of a killed build is removed by the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from flexgen.scratch import OwnedFolder, sweep
from flexgen.storage.disk import DiskStorage

REPO = Path(__file__).resolve().parents[1]


def start_owner(code: str) -> subprocess.Popen:
    """A Python process that runs ``code``, prints the folder it owns, and waits to be killed."""
    script = textwrap.dedent(code) + "\nprint(owned, flush=True)\nimport time\ntime.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    return proc


def owned_by(proc: subprocess.Popen) -> Path:
    line = proc.stdout.readline().strip()
    assert line, "the owner process died before printing its folder"
    return Path(line)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sweep_removes_dead_owners_only(tmp_path):
    parent = tmp_path / "scratch"
    code = f"""
        from flexgen.scratch import OwnedFolder
        folder = OwnedFolder({str(parent)!r})
        (folder.path / "kv.bin").write_bytes(b"x" * 100)
        owned = folder.path
    """
    live, dead = start_owner(code), start_owner(code)
    try:
        live_dir, dead_dir = owned_by(live), owned_by(dead)
        kill(dead)
        removed = sweep(parent)
        assert removed == [dead_dir]
        assert not dead_dir.exists() and not dead_dir.with_name(dead_dir.name + ".lock").exists()
        assert (live_dir / "kv.bin").read_bytes() == b"x" * 100  # its owner still runs
    finally:
        kill(live)
    assert sweep(parent) == [live_dir] and list(parent.iterdir()) == []


def test_an_owner_removes_its_own_folder_and_a_lone_lock_is_swept(tmp_path):
    folder = OwnedFolder(tmp_path)
    assert not folder.created and list(tmp_path.iterdir()) == []  # nothing until first use
    (folder.path / "a").write_text("1")
    assert sweep(tmp_path) == []  # held by this process
    folder.release()
    folder.release()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "123-abc.lock").write_text("")  # a lock whose owner died before making its folder
    (tmp_path / "456-def").mkdir()  # a folder without a lock (its owner died while releasing)
    sweep(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_disk_scratch_and_conversion_temporaries_of_a_killed_run_are_removed(tmp_path):
    offload = tmp_path / "offload"
    proc = start_owner(f"""
        import torch
        from flexgen.storage.disk import DiskStorage
        disk = DiskStorage(offload_dir={str(offload)!r})
        disk.empty("cache/run/0/0/k.data", (16, 2, 4, 8), torch.float16)
        disk.put("weights/abc/layers.0.fc1.weight.data", torch.ones(4, 4))
        (disk._owned.path / "0123.safetensors").write_bytes(b"half a conversion")  # as if killed mid-put
        owned = disk._owned.path
    """)
    try:
        scratch = owned_by(proc)
        assert any(scratch.rglob("*.bin"))
        live = DiskStorage(offload_dir=offload)  # another run while the first one lives
        assert scratch.is_dir()
        live.close()
    finally:
        kill(proc)
    disk = DiskStorage(offload_dir=offload)  # the next run on the same folder
    assert not scratch.exists()
    assert disk.get("weights/abc/layers.0.fc1.weight.data") is not None  # converted weights stay
    assert torch.equal(disk.get("weights/abc/layers.0.fc1.weight.data"), torch.ones(4, 4))
    disk.close()
    assert list((offload / "scratch").iterdir()) == []


def test_half_built_quickstart_of_a_killed_build_is_removed(tmp_path):
    from flexgen.models.quickstart import VERSION, ensure_quickstart

    root = tmp_path / "cache"
    code = f"""
        from flexgen.scratch import OwnedFolder
        build = OwnedFolder({str(root)!r}, ".quickstart-v{VERSION}.")
        (build.path / "model.safetensors").write_bytes(b"half")
        owned = build.path
    """
    dead, live = start_owner(code), start_owner(code)
    try:
        dead_dir, live_dir = owned_by(dead), owned_by(live)
        kill(dead)
        finished = root / f"quickstart-v{VERSION}"
        finished.mkdir()
        (finished / "config.json").write_text("{}")  # a finished checkpoint: no build needed
        assert ensure_quickstart(root) == finished
        assert not dead_dir.exists() and live_dir.is_dir()
    finally:
        kill(live)
