"""Group-wise int4/int8 quantization: accuracy and size targets, layouts, options.

The generic obligations of every compressor (part specs, nbytes, cache slicing) are in
``flexgen.testing.compression`` and run from ``tests/test_contracts.py``; this file checks what
is specific to the group-wise quantizers, including the issue's numeric targets.
"""

from __future__ import annotations

import pytest
import torch

from flexgen import registry
from flexgen.compression.groupwise import Int4Compressor, Int8Compressor
from flexgen.testing.compression import relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: (compressor, max relative L2 error on N(0, 1), max size / float16 size) — the issue's targets.
TARGETS = {
    "int4": (Int4Compressor, 0.11, 0.29),
    "int8": (Int8Compressor, 0.007, 0.54),
}


def stored_bytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_targets_on_standard_normal(name: str, dtype: torch.dtype, axis: int) -> None:
    cls, max_error, max_ratio = TARGETS[name]
    compressor = cls(group_size=64, axis=axis)
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    parts = compressor.compress(x)
    y = compressor.decompress(parts, tuple(x.shape), dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert relative_error(y, x) <= max_error
    ratio = stored_bytes(parts) / (x.numel() * 2)
    assert ratio <= max_ratio
    assert compressor.nbytes(tuple(x.shape), dtype) == stored_bytes(parts)


def test_registered_names() -> None:
    assert registry.load("compressor", "int4") is Int4Compressor
    assert registry.load("compressor", "int8") is Int8Compressor
    c = registry.create("compressor", {"name": "int4", "group_size": 32, "axis": 0})
    assert (c.group_size, c.axis) == (32, 0)


@pytest.mark.parametrize("cls", [Int4Compressor, Int8Compressor])
@pytest.mark.parametrize(
    "shape,axis,group_size",
    [
        ((7,), -1, 64),  # one partial group, odd length (int4 packs a half byte of padding)
        ((3, 5, 67), -1, 64),  # a full and a partial group
        ((67, 3), 0, 64),  # partial group along the first axis
        ((2, 3, 130), 1, 4),  # grouping a middle axis
        ((5, 33), -1, 1),  # degenerate groups of one value: exact up to float16
        ((4, 2, 3, 16), -1, 64),  # a cache slice whose head dim is smaller than the group
        ((1, 1), 0, 64),
    ],
)
def test_odd_shapes_and_partial_groups(cls, shape, axis, group_size) -> None:
    compressor = cls(group_size=group_size, axis=axis)
    x = torch.randn(shape)
    specs = compressor.part_specs(shape, x.dtype)
    parts = compressor.compress(x)
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == specs
    y = compressor.decompress(parts, shape, x.dtype)
    assert y.shape == x.shape
    bound = 0.25 if cls is Int4Compressor else 0.02
    assert relative_error(y, x) <= bound
    # Storage is not padded: the grouped axis keeps its length (int4: half of it, rounded up).
    length = shape[axis]
    expected = (length + 1) // 2 if cls is Int4Compressor else length
    assert specs["data"][0][axis] == expected
    assert specs["scale"][0][axis] == -(-length // group_size)


@pytest.mark.parametrize("cls", [Int4Compressor, Int8Compressor])
def test_partial_group_padding_does_not_widen_range(cls) -> None:
    """The last partial group is quantized on its own range, not on padding values."""
    compressor = cls(group_size=8)
    x = torch.cat([torch.randn(8), torch.tensor([100.0, 100.5, 101.0])])
    y = compressor.decompress(compressor.compress(x), (11,), torch.float32)
    step = 1.0 / compressor.max_code
    assert (y[8:] - x[8:]).abs().max().item() <= step  # range 1 → step 1/max_code


@pytest.mark.parametrize("cls", [Int4Compressor, Int8Compressor])
def test_extremes_and_constants_are_exact(cls) -> None:
    """Group minima decode exactly, maxima up to float16 rounding of the step, constants exactly."""
    compressor = cls(group_size=4)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25], [3.0, 3.0, 3.0, 3.0], [-2.0, 2.0, 0.0, 1.0]])
    y = compressor.decompress(compressor.compress(x), tuple(x.shape), torch.float32)
    assert torch.equal(y[1], x[1])
    for row in (0, 2):
        assert y[row].min() == x[row].min()
        span = (x[row].max() - x[row].min()).item()
        assert abs(y[row].max().item() - x[row].max().item()) <= span * 2**-10
    zeros = torch.zeros(3, 5)
    assert torch.equal(compressor.decompress(compressor.compress(zeros), (3, 5), torch.float32), zeros)


def test_int4_packs_two_codes_per_byte() -> None:
    compressor = Int4Compressor(group_size=16)
    x = torch.arange(16, dtype=torch.float32)  # min 0, step 1: codes are the values
    parts = compressor.compress(x)
    assert parts["data"].tolist() == [(2 * i) | ((2 * i + 1) << 4) for i in range(8)]
    assert parts["scale"].item() == 1.0 and parts["min"].item() == 0.0


@pytest.mark.parametrize("cls", [Int4Compressor, Int8Compressor])
def test_decompress_checks_parts(cls) -> None:
    compressor = cls()
    parts = compressor.compress(torch.randn(4, 64))
    with pytest.raises(ValueError, match="part 'data'"):
        compressor.decompress(parts, (5, 64), torch.float32)
    with pytest.raises(ValueError, match="missing part 'scale'"):
        compressor.decompress({"data": parts["data"], "min": parts["min"]}, (4, 64), torch.float32)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"group_size": 0}, ValueError, "group_size"),
        ({"group_size": -3}, ValueError, "group_size"),
        ({"group_size": 64.0}, TypeError, "group_size"),
        ({"group_size": "64"}, TypeError, "group_size"),
        ({"group_size": True}, TypeError, "group_size"),
        ({"axis": 1.5}, TypeError, "axis"),
        ({"bits": 3}, TypeError, "bits"),  # not an option: bits is the class
        ({"grup_size": 64}, TypeError, "grup_size"),
    ],
)
def test_option_errors_name_the_option(options, error, match) -> None:
    with pytest.raises(error, match=match):
        Int4Compressor(**options)


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(ValueError, match="axis=2"):
        Int8Compressor(axis=2).part_specs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="axis=-1"):
        Int8Compressor().part_specs((), torch.float32)
    with pytest.raises(TypeError, match="floating-point"):
        Int8Compressor().compress(torch.ones(4, dtype=torch.int32))


def test_empty_tensor() -> None:
    c = Int4Compressor()
    x = torch.empty(0, 3, 64)
    y = c.decompress(c.compress(x), (0, 3, 64), torch.float16)
    assert y.shape == (0, 3, 64) and y.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [Int4Compressor, Int8Compressor])
def test_cuda_matches_cpu(cls) -> None:
    compressor = cls()
    x = torch.randn(64, 200, dtype=torch.float16)
    cpu = compressor.compress(x)
    gpu = compressor.compress(x.cuda())
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        assert torch.equal(gpu[k].cpu(), cpu[k])
    y_cpu = compressor.decompress(cpu, tuple(x.shape), torch.float16)
    y_gpu = compressor.decompress(gpu, tuple(x.shape), torch.float16)
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-3)
