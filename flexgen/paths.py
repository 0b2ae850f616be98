"""Where flexgen keeps files between runs: one folder, ``$FLEXGEN_CACHE`` or ``~/.cache/flexgen``.

Under it: ``offload/`` (disk-tier tensors, unless ``output.offload_dir`` says otherwise), the
measured hardware profiles, and the built-in quickstart checkpoint.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FLEXGEN_CACHE`` or ``~/.cache/flexgen``."""
    return Path(os.environ.get("FLEXGEN_CACHE") or Path.home() / ".cache" / "flexgen").expanduser()
