"""The top-k backend's own checks: exact dense fallback, the sparse rule, options, registry."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "flexgen_sparse_attention",
    reason="flexgen-sparse-attention is not installed (pip install ./plugins/flexgen-sparse-attention)",
)

from flexgen import registry  # noqa: E402
from flexgen.attention.gpu import GPUAttention  # noqa: E402
from flexgen.errors import PluginError  # noqa: E402
from flexgen_sparse_attention import TopKAttention  # noqa: E402
from flexgen_sparse_attention.topk import topk_reference  # noqa: E402


def make_inputs(b: int = 3, h: int = 4, t: int = 23, d: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Decode inputs with left padding of different lengths per sequence (as the engine pads)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g) / math.sqrt(d)
    k = torch.randn(b, h, t, d, generator=g)
    v = torch.randn(b, h, t, d, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        valid[i, : 3 * i] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), valid


def test_registered_as_topk_by_its_distribution() -> None:
    assert registry.load("attention", "topk") is TopKAttention
    info = {(p.kind, p.name): p for p in registry.list_plugins()}[("attention", "topk")]
    assert info.distribution == "flexgen-sparse-attention"


def test_created_from_config_options() -> None:
    backend = registry.create("attention", {"name": "topk", "ratio": 0.25, "device": "cpu"})
    assert isinstance(backend, TopKAttention) and backend.ratio == 0.25
    assert backend.device(torch.device("cuda")) == torch.device("cpu")
    assert TopKAttention().device(torch.device("cuda")) == torch.device("cuda")


@pytest.mark.parametrize("spec", [{"ratio": 0}, {"ratio": 1.5}, {"ratio": "half"}, {"device": "gpu"}, {"k": 3}])
def test_bad_options_are_a_one_line_plugin_error(spec: dict) -> None:
    with pytest.raises(PluginError, match="topk"):
        registry.create("attention", {"name": "topk", **spec})


@pytest.mark.parametrize("seed", range(3))
def test_ratio_one_is_exactly_dense_gpu_backend(seed: int) -> None:
    q, k, v, valid = make_inputs(seed=seed)
    assert torch.equal(TopKAttention(ratio=1.0).decode(q, k, v, valid), GPUAttention().decode(q, k, v, valid))


def test_k_covering_a_short_prefix_is_exactly_dense() -> None:
    q, k, v, valid = make_inputs(t=4)
    valid[:] = True
    # ceil(0.5 * 4) = 2 < 4: sparse; ceil(0.9 * 4) = 4: dense, bit for bit
    assert not torch.equal(TopKAttention(ratio=0.5).decode(q, k, v, valid), GPUAttention().decode(q, k, v, valid))
    assert torch.equal(TopKAttention(ratio=0.9).decode(q, k, v, valid), GPUAttention().decode(q, k, v, valid))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_sparse_rule_matches_topk_reference(ratio: float) -> None:
    q, k, v, valid = make_inputs(seed=4)
    out = TopKAttention(ratio=ratio).decode(q, k, v, valid)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), topk_reference(q, k, v, valid, ratio), atol=1e-5, rtol=1e-5)


def test_keep_counts() -> None:
    valid = torch.zeros(4, 40, dtype=torch.bool)
    for i, n in enumerate([30, 1, 10, 40]):
        valid[i, 40 - n :] = True
    assert TopKAttention(ratio=0.1).keep_counts(valid).tolist() == [3, 1, 1, 4]
    assert TopKAttention(ratio=0.15).keep_counts(valid).tolist() == [5, 1, 2, 6]


def test_one_kept_position_returns_its_value_row() -> None:
    q, k, v, valid = make_inputs(b=1, t=50)
    out = TopKAttention(ratio=0.01).decode(q, k, v, valid)
    best = (q @ k.transpose(-1, -2)).argmax(dim=-1)  # (1, H, 1)
    expected = torch.gather(v, 2, best[..., None].expand(-1, -1, -1, v.shape[-1]))
    torch.testing.assert_close(out, expected)


def test_padding_is_never_attended() -> None:
    q, k, v, valid = make_inputs(b=3, t=60, seed=5)
    valid[1, :55] = False  # 5 valid positions keep 1, beside sequences that keep 12
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :].expand(-1, k.shape[1], -1)] = 1e4  # huge scores at padding
    v2[~valid[:, None, :].expand(-1, k.shape[1], -1)] = float("nan")
    out = TopKAttention(ratio=0.2).decode(q, k2, v2, valid)
    torch.testing.assert_close(out, TopKAttention(ratio=0.2).decode(q, k, v, valid))


def test_approximation_improves_with_ratio() -> None:
    q, k, v, valid = make_inputs(t=200, seed=6)
    dense = GPUAttention().decode(q, k, v, valid)
    errors = [(TopKAttention(ratio=r).decode(q, k, v, valid) - dense).abs().mean().item() for r in (0.05, 0.2, 0.6)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype: torch.dtype) -> None:
    q, k, v, valid = make_inputs(dtype=dtype)
    for ratio in (0.3, 1.0):
        out = TopKAttention(ratio=ratio).decode(q, k, v, valid)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(
            out.float(), topk_reference(q.float(), k.float(), v.float(), valid, ratio).float(), atol=2e-2, rtol=2e-2
        )


def test_prefill_is_dense() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :2] = False
    assert torch.equal(TopKAttention(ratio=0.1).prefill(q, k, v, valid), GPUAttention().prefill(q, k, v, valid))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", ["compute", "cpu"])
def test_cuda_inputs(device: str) -> None:
    backend = TopKAttention(ratio=0.25, device=device)
    where = backend.device(torch.device("cuda"))
    q, k, v, valid = (t.to(where) for t in make_inputs(dtype=torch.float16))
    out = backend.decode(q, k, v, valid)
    assert out.device == where and out.dtype == torch.float16
    torch.testing.assert_close(
        out.float().cpu(),
        topk_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), valid.cpu(), 0.25).float(),
        atol=2e-2,
        rtol=2e-2,
    )
