"""flexgen's attention contract suite, run against the top-k backend.

The suite checks exact attention against a float64 reference. ``ratio: 1.0`` is exact, so it
runs the whole suite unchanged, on both of its devices. A sparse ratio is an approximation by
design: it runs the suite too, with the decode reference replaced by the float64 top-k rule
(everything else — shapes, dtypes, devices, masked values ignored, dense prefill, cache
untouched — is the same obligation).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "flexgen_sparse_attention",
    reason="flexgen-sparse-attention is not installed (pip install ./plugins/flexgen-sparse-attention)",
)

from flexgen import registry  # noqa: E402
from flexgen.attention.base import AttentionBackend  # noqa: E402
from flexgen.testing.attention import AttentionBackendContract  # noqa: E402
from flexgen_sparse_attention.topk import topk_reference  # noqa: E402


class TestTopKRatioOneContract(AttentionBackendContract):
    """``ratio: 1.0`` is dense attention: the unmodified suite, decode on both devices."""

    @pytest.fixture(params=["compute", "cpu"])
    def attention(self, request: pytest.FixtureRequest) -> AttentionBackend:
        return registry.create("attention", {"name": "topk", "ratio": 1.0, "device": request.param})


class TestTopKSparseContract(AttentionBackendContract):
    """Sparse ratios: the suite, with decode held to the top-k reference."""

    @pytest.fixture(params=[0.1, 0.3, 0.6])
    def attention(self, request: pytest.FixtureRequest) -> AttentionBackend:
        return registry.create("attention", {"name": "topk", "ratio": request.param})

    def reference_decode(self, attention: AttentionBackend, q, k, v, valid) -> torch.Tensor:
        # The reference ranks the same (possibly low-precision) inputs the backend ranks, so
        # rounding cannot swap two near-equal scores at the cut-off between them.
        return topk_reference(q.cpu(), k.cpu(), v.cpu(), valid.cpu(), attention.ratio)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestTopKRatioOneContractCUDA(TestTopKRatioOneContract):
    """Computing on CUDA: decode on the GPU (``compute``) or delegated to the host (``cpu``)."""

    compute_device = "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestTopKSparseContractCUDA(TestTopKSparseContract):
    compute_device = "cuda"
