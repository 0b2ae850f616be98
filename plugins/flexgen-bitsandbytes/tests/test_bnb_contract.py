"""flexgen's compressor contract suite, run against every bitsandbytes compressor.

All three are cache-compatible: blocks never straddle last-axis rows (see the package
docstring), so the cache checks of the suite run too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)")
plugin = pytest.importorskip(
    "flexgen_bitsandbytes", reason="flexgen-bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)"
)
_CPU_PROBLEM = plugin.cpu_support()
pytestmark = pytest.mark.skipif(_CPU_PROBLEM is not None, reason=str(_CPU_PROBLEM))

from flexgen import registry  # noqa: E402
from flexgen.compression.base import Compressor  # noqa: E402
from flexgen.testing.compression import CompressorContract  # noqa: E402

# (config spec, ‖error‖/‖x‖ bound on N(0, 1), bytes / float16 bytes) — bounds sit a little
# above what bitsandbytes 0.50 gives (NF4 0.093, FP4 0.122, int8 0.0072 at 256 per row).
CASES = {
    "bnb-nf4": ({"name": "bnb-nf4"}, 0.10, 0.2813),
    "bnb-nf4-blocksize32": ({"name": "bnb-nf4", "blocksize": 32}, 0.10, 0.3126),
    "bnb-fp4": ({"name": "bnb-fp4"}, 0.13, 0.2813),
    "bnb-int8": ({"name": "bnb-int8"}, 0.009, 0.508),
}


class TestBitsAndBytesContract(CompressorContract):
    """Each compressor built exactly as a config names it, through flexgen's registry."""

    cache_compatible = True

    @pytest.fixture(params=sorted(CASES))
    def compressor(self, request: pytest.FixtureRequest) -> Compressor:
        spec, bound, size = CASES[request.param]
        compressor = registry.create("compressor", spec)
        compressor._contract_bounds = (bound, size)  # read back by the two hooks below
        return compressor

    def relative_error_bound(self, compressor: Compressor) -> float:
        return compressor._contract_bounds[0]

    def size_ratio_bound(self, compressor: Compressor) -> float | None:
        return compressor._contract_bounds[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestBitsAndBytesContractCUDA(TestBitsAndBytesContract):
    """The same suite with inputs (and so parts) on the GPU: bitsandbytes' CUDA kernels."""

    device = "cuda"
