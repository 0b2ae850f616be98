"""bitsandbytes-backed compressors for FlexGen, as a third-party plugin.

Registered under the entry-point group ``flexgen.compressors`` as ``bnb-nf4``, ``bnb-fp4``
and ``bnb-int8``; select one with ``plugins.weight_compressor: bnb-nf4`` (or
``{name: bnb-nf4, blocksize: 128}``), and likewise for ``plugins.cache_compressor``.
"""

from flexgen_bitsandbytes.compressor import BitsAndBytes4bit, BnbFP4, BnbInt8, BnbNF4, cpu_support

__all__ = ["BitsAndBytes4bit", "BnbFP4", "BnbInt8", "BnbNF4", "cpu_support"]
__version__ = "0.1.0"
