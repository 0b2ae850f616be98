"""Storage tiers (entry-point group ``flexgen.storage``): where a tensor lives.

``base.py`` is the interface (:class:`~flexgen.storage.base.StorageBackend`); ``gpu.py``
(compute-device memory), ``cpu.py`` (host memory, page-locked for CUDA) and ``disk.py``
(safetensors files and memory-mapped caches under the offload folder) are the built-ins.
"""
