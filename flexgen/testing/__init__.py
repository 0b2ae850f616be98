"""Reusable pytest contract suites, one per plugin kind.

Built-in and third-party plugins are held to the same obligations by subclassing one of these
plain classes in a test module and saying how to build the plugin::

    # tests/test_my_compressor.py in a third-party package
    from flexgen.testing.compression import CompressorContract
from flexgen.testing.models import ModelFamilyContract
    from my_package import MyCompressor

    class TestMyCompressor(CompressorContract):
        max_relative_error = 0.05      # what your format promises on N(0, 1) data
        cache_compatible = True        # groups along the last axis: usable for the KV cache

        def make_compressor(self):
            return MyCompressor()

The suites (each a class with ``test_*`` methods; pytest collects them through your
``Test*`` subclass only):

- :class:`flexgen.testing.storage.StorageBackendContract` — ``make_storage(tmp_path)``
- :class:`flexgen.testing.attention.AttentionBackendContract` — ``make_attention()``
- :class:`flexgen.testing.compression.CompressorContract` — ``make_compressor()``
- :class:`flexgen.testing.scheduling.SchedulerContract` — ``make_scheduler()``
- :class:`flexgen.testing.models.ModelFamilyContract` — ``make_family()`` and ``make_config()``
  (a tiny HF ``config.json`` dict of the family)

Each suite reaches the plugin through a fixture (``storage``, ``attention``, ``compressor``,
``scheduler``) that calls the factory method, so a subclass may instead override the fixture,
for instance to parametrise over several plugins (``tests/test_contracts.py`` does this for
every registered built-in). Inputs are fresh random tensors on every run, and every failure
message names its seed: ``FLEXGEN_TEST_SEED=<seed> pytest ...`` replays it. The disk tier uses
pytest's ``tmp_path``. Helpers for suites of your own: ``flexgen.testing._random.fresh_generator``,
``flexgen.testing.attention.reference_attention`` / ``random_valid``,
``flexgen.testing.compression.relative_error``; and for tests inside the real engine,
:mod:`flexgen.testing.reference` (a tiny random HF checkpoint, HF's greedy tokens to match).
"""

from flexgen.testing.attention import AttentionBackendContract
from flexgen.testing.compression import CompressorContract
from flexgen.testing.models import ModelFamilyContract
from flexgen.testing.scheduling import SchedulerContract
from flexgen.testing.storage import StorageBackendContract

__all__ = ["AttentionBackendContract", "CompressorContract", "ModelFamilyContract", "SchedulerContract",
           "StorageBackendContract"]
