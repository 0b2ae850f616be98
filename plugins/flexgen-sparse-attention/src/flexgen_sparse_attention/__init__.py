"""Top-k sparse decode attention for FlexGen, as a third-party plugin.

Registered under the entry-point group ``flexgen.attention`` as ``topk``; select it with
``plugins.attention: {name: topk, ratio: 0.1}``. Nothing in flexgen itself names it.
"""

from flexgen_sparse_attention.topk import TopKAttention

__all__ = ["TopKAttention"]
__version__ = "0.1.0"
