"""Run several ``flexgen`` commands in one Python process and report, for each, what a user sees.

Each command goes through :func:`flexgen.cli.main`, as the console script does, with its
stderr captured on its own; around each, the working folder is fingerprinted (every file's
bytes, every link's target), so a test can check that a refused command changed nothing. One
process for many commands: torch and Lightning are imported once instead of once per command.

    python -m tests.cli_driver '[["predict", "--config", "c.yaml", ...], ...]'   # in the folder

prints one JSON line: ``[{"code", "stderr", "changed", "added"}, ...]``. An exception escaping
``main`` (which the CLI must never let happen for a user mistake) is reported as the code
``"raised <type>: <message>"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path


def said(stderr: str) -> list[str]:
    """stderr without what a run says while it works (``flexgen: ...`` lines, progress bars): its
    errors and warnings, each of which must be one line."""
    lines = stderr.replace("\r", "\n").strip().splitlines()
    return [line for line in lines if line.strip() and not line.startswith(("flexgen: ", "generating", "placing weights"))]


def fingerprint(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of a file's bytes, or ``link:<target>``; folders are not listed."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    from flexgen.cli import main as cli

    root = Path.cwd()
    results = []
    for argv in json.loads(sys.argv[1]):
        before = fingerprint(root)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli(argv)
            except BaseException as exc:  # noqa: BLE001 - reported, never swallowed silently
                code = f"raised {type(exc).__name__}: {exc}"
        after = fingerprint(root)
        results.append({
            "code": code,
            "stderr": err.getvalue(),
            "changed": sorted(k for k in before if after.get(k) != before[k]),
            "added": sorted(k for k in after if k not in before),
        })
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
