"""The bitsandbytes compressors' own checks: layout, error, equality with bitsandbytes itself.

Skipped, with the reason, where bitsandbytes or this package is not installed, or where
bitsandbytes cannot quantize on this machine's CPU.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)")
plugin = pytest.importorskip(
    "flexgen_bitsandbytes", reason="flexgen-bitsandbytes is not installed (pip install ./plugins/flexgen-bitsandbytes)"
)
_CPU_PROBLEM = plugin.cpu_support()
pytestmark = pytest.mark.skipif(_CPU_PROBLEM is not None, reason=str(_CPU_PROBLEM))

from flexgen import registry  # noqa: E402
from flexgen.errors import PluginError  # noqa: E402
from flexgen_bitsandbytes import BitsAndBytes4bit, BnbFP4, BnbInt8, BnbNF4  # noqa: E402

COMPRESSORS = {
    "bnb-nf4": BnbNF4,
    "bnb-fp4": BnbFP4,
    "bnb-int8": BnbInt8,
}
#: mean |error| / mean |x| on N(0, 1) data, with headroom over what each format gives
MAX_REL_ERROR = {"bnb-nf4": 0.10, "bnb-fp4": 0.13, "bnb-int8": 0.012}
SHAPES = [(96, 256), (3, 2, 4, 64), (5, 2, 3, 80), (7,), ()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((y.float() - x.float()).abs().mean() / x.float().abs().mean()).item()


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_registered_under_its_name(name: str) -> None:
    assert registry.load("compressor", name) is COMPRESSORS[name]
    info = {(p.kind, p.name): p for p in registry.list_plugins()}[("compressor", name)]
    assert info.distribution == "flexgen-bitsandbytes"


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_match_part_specs_and_round_trip(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    c = COMPRESSORS[name]()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    parts = c.compress(x)
    specs = c.part_specs(shape, dtype)
    assert {n: (tuple(p.shape), p.dtype) for n, p in parts.items()} == specs
    y = c.decompress(parts, shape, dtype)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    if x.numel() >= 64:
        assert rel_error(x, y) < MAX_REL_ERROR[name]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes_itself(quant_type: str) -> None:
    """Where no padding is needed, the plugin is exactly bitsandbytes' quantize→dequantize."""
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    c = BitsAndBytes4bit(quant_type=quant_type, blocksize=64)
    packed, state = bnb.functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    expected = bnb.functional.dequantize_4bit(packed, state)
    parts = c.compress(x)
    assert torch.equal(parts["packed"].reshape(-1), packed.reshape(-1))
    assert torch.equal(c.decompress(parts, tuple(x.shape), torch.float32), expected)


def test_int8_equals_bitsandbytes_itself() -> None:
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    data, scale, _ = bnb.functional.int8_vectorwise_quant(x)
    expected = bnb.functional.int8_vectorwise_dequant(data, scale)
    assert torch.equal(BnbInt8().decompress(BnbInt8().compress(x), (16, 96), torch.float32), expected)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_zeros_stay_zero(name: str) -> None:
    """A zero-filled (fresh) cache buffer decompresses to zeros, not NaN."""
    c = COMPRESSORS[name]()
    z = torch.zeros(4, 2, 64)
    assert torch.equal(c.decompress(c.compress(z), (4, 2, 64), torch.float32).abs(), z)
    zero_parts = {k: torch.zeros(s, dtype=dt) for k, (s, dt) in c.part_specs((4, 2, 64), torch.float32).items()}
    assert torch.equal(c.decompress(zero_parts, (4, 2, 64), torch.float32).abs(), z)


def test_bytes() -> None:
    shape = (768, 3072)
    raw = 768 * 3072 * 2  # float16
    assert BnbNF4().nbytes(shape, torch.float16) == raw * 4.5 / 16
    assert BnbNF4(blocksize=128).nbytes(shape, torch.float16) == raw * 4.25 / 16
    assert BnbInt8().nbytes(shape, torch.float16) == 768 * 3072 + 768 * 4


def test_padding_of_rows_not_multiple_of_blocksize() -> None:
    specs = BnbNF4(blocksize=64).part_specs((5, 2, 3, 80), torch.float16)
    assert specs["packed"] == ((5, 2, 3, 64), torch.uint8)
    assert specs["absmax"] == ((5, 2, 3, 2), torch.float32)


def test_options_are_checked_with_a_clear_error() -> None:
    registry.create("compressor", {"name": "bnb-nf4", "blocksize": 128})
    with pytest.raises(PluginError, match="blocksize"):
        registry.create("compressor", {"name": "bnb-nf4", "blocksize": 100})
    with pytest.raises(PluginError, match="bnb-int8"):
        registry.create("compressor", {"name": "bnb-int8", "blocksize": 64})
    with pytest.raises(TypeError, match="quant_type"):
        BitsAndBytes4bit(quant_type="int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_cuda_parts_decompress_like_cpu_parts(name: str) -> None:
    """Parts made on the GPU decompress on the CPU (and back) to nearly the same values."""
    c = COMPRESSORS[name]()
    x = torch.randn(6, 2, 3, 80, generator=torch.Generator().manual_seed(8)).half()
    gpu_parts = c.compress(x.cuda())
    assert all(p.is_cuda for p in gpu_parts.values())
    on_gpu = c.decompress(gpu_parts, tuple(x.shape), torch.float16)
    on_cpu = c.decompress({k: v.cpu() for k, v in gpu_parts.items()}, tuple(x.shape), torch.float16)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
    assert rel_error(x, on_cpu) < MAX_REL_ERROR[name]
