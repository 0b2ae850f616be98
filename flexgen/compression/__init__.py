"""Compressors (entry-point group ``flexgen.compressors``): how a tensor is packed at rest.

``base.py`` is the interface (:class:`~flexgen.compression.base.Compressor`); ``none.py`` and
``groupwise.py`` (group-wise int4 / int8) are the built-ins; ``dequant.py`` and
``_triton_dequant.py`` unpack in one pass (a fused kernel on CUDA).
"""
