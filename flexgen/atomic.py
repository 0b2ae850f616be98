"""Files written whole or never: JSON through a temporary sibling, fsync and rename.

A metrics file, a job file or a bench result read by another program after a crash, a full
disk or a SIGKILL is either the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flexgen.errors import ConfigError


def write_json_atomic(path: Path, obj: Any, key: str = "output.path") -> None:
    """Write JSON to a temporary sibling, fsync, rename over ``path``: never a half file.

    ``key`` names what the user set, for the one-line error (a full disk, say).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path} ({exc.strerror or exc})") from exc
