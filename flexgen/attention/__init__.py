"""Attention backends (entry-point group ``flexgen.attention``): where and how attention runs.

``base.py`` is the interface (:class:`~flexgen.attention.base.AttentionBackend`); ``gpu.py``
(SDPA on the compute device) and ``cpu.py`` (FlexGen's CPU delegation, blocked over the cache
in ``blocked.py``) are the built-ins. A backend imports only its base and the compressors'
interface (a packed cache carries its compressor).
"""
