"""The documentation names files that exist, lists every folder in its layout, and speaks of the
project (not of the tracker that planned it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
TRACKED = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
#: top-level names a repository path in the docs starts with (outputs/ and other ignored folders are not)
TOP = sorted({Path(f).parts[0] for f in TRACKED}) or sorted(p.name for p in REPO.iterdir())
PATH = re.compile(r"^(?:\./)?(?:" + "|".join(map(re.escape, TOP)) + r")(?:/[\w.\-]+)*/?$")


def named_paths(text: str) -> set[str]:
    """Backticked words and link targets that are repository paths (not commands, globs or placeholders)."""
    words = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)#\s]+)\)", text)
    return {w for w in words if PATH.match(w) and ("/" in w or "." in w)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_file_exists(doc):
    base = REPO if doc.parent == REPO else doc.parent
    missing = sorted(p for p in named_paths(doc.read_text(encoding="utf-8"))
                     if not (REPO / p).exists() and not (base / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_the_path_scan_sees_paths():
    """The scan is not vacuous: it finds the paths the README is known to name."""
    found = named_paths((REPO / "README.md").read_text(encoding="utf-8"))
    assert {"scripts/install.sh", "docs/python-api.md"} <= found


@pytest.mark.parametrize("doc", DOCS + sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_docs_speak_of_the_project(doc):
    hits = [line for line in doc.read_text(encoding="utf-8").splitlines()
            if re.search(r"\b(the issue|issue \d+|this task)\b", line, re.IGNORECASE)]
    assert not hits, f"{doc.name}: {hits}"


def test_contributing_layout_lists_every_folder_and_module():
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("```", 2)[1]
    words = set(re.findall(r"[\w.\-]+/?", layout))
    tracked = TRACKED
    if not tracked:
        pytest.skip("not a git checkout")
    folders = {Path(f).parts[0] for f in tracked if len(Path(f).parts) > 1}
    folders |= {Path(f).parts[1] for f in tracked if Path(f).parts[0] in ("flexgen", "configs") and len(Path(f).parts) > 2}
    modules = {Path(f).name for f in tracked if Path(f).parent == Path("flexgen") and f.endswith(".py")}
    missing = sorted(f"{name}/" for name in folders if f"{name}/" not in words) + sorted(m for m in modules if m not in words)
    assert not missing, f"CONTRIBUTING.md's layout does not list {missing}"
