"""FlexGen: high-throughput batch generation with OPT and Llama-family models on one GPU, or none.

Public API::

    from flexgen import batch_generate            # a batch job, as flexgen predict runs it
    results = batch_generate("configs/quickstart.yaml", ["The policy says"])

    from flexgen import Policy, load_engine      # the engine itself, on token ids
    engine = load_engine("opt-125m", policy=Policy(weights_gpu=0, weights_cpu=100))
    outputs = engine.generate([[2, 100, 200]], max_new_tokens=8)
"""

from flexgen.errors import FlexGenError
from flexgen.policy import Policy
from flexgen.registry import available as available_plugins
from flexgen.registry import list_plugins

__all__ = ["Completion", "Engine", "FlexGenError", "Policy", "available_plugins", "batch_generate", "list_plugins",
           "load_engine"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in the model and plugins; import it only when asked for.
    if name in ("Engine", "load_engine"):
        from flexgen import engine

        return getattr(engine, name)
    if name in ("batch_generate", "Completion"):
        from flexgen import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'flexgen' has no attribute {name!r}")
