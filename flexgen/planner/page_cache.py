"""What of the weights on disk stays in the page cache between steps, for pricing disk reads.

The disk tier (:class:`flexgen.storage.disk.DiskStorage`) keeps the first layers of a model
that does not fit in memory cached, up to ``page_cache_fraction`` of the memory available
when generation starts, and gives the pages of the others back after use. Those bytes are
read at the page cache's rate every step after the first, the rest at the disk's; a bound
that priced them all at the disk's rate would be one the engine beats.
"""

from __future__ import annotations

from typing import Any

from flexgen.registry import parse_spec
from flexgen.storage.disk import PAGE_CACHE_FRACTION, available_memory


def page_cache_fraction(plugins: dict[str, Any]) -> float:
    """The disk tier's ``page_cache_fraction`` in a run's plugins: the config's option, else the default."""
    spec = (plugins.get("storage") or {}).get("disk")
    if spec is None:
        return PAGE_CACHE_FRACTION
    name, options = parse_spec(spec, "plugins.storage.disk")
    return float(options.get("page_cache_fraction", PAGE_CACHE_FRACTION)) if name == "disk" else PAGE_CACHE_FRACTION


def kept_weight_bytes(weights_on_disk: float, fraction: float, memory: float | None = None) -> tuple[float, float]:
    """(bytes of the weights on disk kept cached between steps, the memory it is a share of).

    ``memory``: the memory available to the page cache (a profile's, for a machine not measured
    here); None measures what is available now, as the disk tier does.
    """
    memory = available_memory() if memory is None else memory
    return min(weights_on_disk, fraction * memory), memory
