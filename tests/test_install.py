"""``scripts/install.sh`` leaves the clone as git checked it out: no build/ or *.egg-info folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_install_leaves_no_build_folders(tmp_path):
    """A copy of the tracked files, installed into a venv that sees this interpreter's packages
    (so pip installs flexgen and the plugins, nothing else); a folder the user had is kept."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked files from")
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    (clone / "build" / "mine").mkdir(parents=True)  # the user's own build/ folder
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    result = subprocess.run(["bash", "scripts/install.sh"], cwd=clone, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHON": str(python)})
    assert result.returncode == 0, result.stderr[-3000:]
    leftovers = sorted(str(p.relative_to(clone)) for pattern in ("**/build", "**/*.egg-info") for p in clone.glob(pattern))
    assert leftovers == ["build"], leftovers
    assert (clone / "build" / "mine").is_dir()
    version = subprocess.run([str(env_dir / "bin" / "flexgen"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout.startswith("flexgen "), version.stderr  # the editable install still works
