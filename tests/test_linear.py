"""flexgen.linear: float32 CPU products go to the few-row kernel (decode), oneDNN (large weights)
or F.linear, each with F.linear's results, and packed weights are multiplied a block of rows at a time.

The default thresholds send no product of the tiny test models to the few-row kernel or oneDNN,
so the engine tests here lower them to send every product to one of them, and check greedy
tokens against HF transformers for OPT and Llama checkpoints, weights in every tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from flexgen import Policy, dtypes, load_engine
from flexgen import linear as linear_module
from flexgen.engine.placement import Unpack
from flexgen.errors import ConfigError
from flexgen.kernels import few_rows
from flexgen.linear import linear, prefers_row_major, uses_few_rows, uses_onednn
from flexgen.models.opt import spec_for_size
from flexgen.models.opt_family import OPTFamily
from flexgen.testing.models import TensorRows
from flexgen.testing.reference import hf_greedy
from tests.conftest import make_checkpoint
from tests.test_llama_math import _hf_model

needs_onednn = pytest.mark.skipif(not linear_module.onednn_enabled(), reason="this torch build has no oneDNN linear")
needs_few_rows = pytest.mark.skipif(not linear_module.few_rows_enabled(),
                                    reason=f"no few-row kernel here: {linear_module.few_rows_off_reason()}")
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def _ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.fixture
def fresh_setting(monkeypatch):
    """Re-read FLEXGEN_CPU_LINEAR in the test, and again after it."""
    _forget_setting()
    yield monkeypatch
    monkeypatch.delenv(linear_module.ENV_VAR, raising=False)
    _forget_setting()


def _forget_setting() -> None:
    linear_module.onednn_enabled.cache_clear()
    linear_module.few_rows_enabled.cache_clear()


def _large_product(layout: str, with_bias: bool, x_shape: tuple[int, ...]):
    """A 2048 x 1024 weight laid out row-major, column-major or as a column slice of a wider one;
    a bias or None; and ``x``."""
    torch.manual_seed(0)
    weight = torch.randn(2048, 1024 if layout != "sliced" else 1536) * 0.03
    if layout == "column-major":
        weight = weight.t().contiguous().t()
    elif layout == "sliced":
        weight = weight[:, 256:1280]
    return weight, torch.randn(2048) if with_bias else None, torch.randn(*x_shape)


@needs_onednn
@pytest.mark.parametrize("layout", ["row-major", "column-major", "sliced"])
@pytest.mark.parametrize("x_shape", [(32, 1024), (8, 1, 1024), (2, 3, 1024), (1, 1024), (4, 128, 1024)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_of_large_weights_go_to_onednn_and_equal_f_linear(fresh_setting, layout, x_shape, with_bias):
    """With the few-row kernel off, oneDNN takes every product of a large weight."""
    fresh_setting.setenv(linear_module.ENV_VAR, "onednn")
    weight, bias, x = _large_product(layout, with_bias, x_shape)
    assert uses_onednn(tuple(weight.shape), x.dtype, CPU)
    expected = F.linear(x, weight, bias)
    out = None

    def compute():
        nonlocal out
        out = linear(x, weight, bias)

    # a weight with gaps between its rows goes to F.linear: oneDNN would copy it element by element
    assert ("mkldnn::_linear_pointwise" in _ops(compute)) == (layout != "sliced")
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@needs_few_rows
@pytest.mark.parametrize("layout", ["row-major", "column-major", "sliced"])
@pytest.mark.parametrize("x_shape", [(32, 1024), (8, 1, 1024), (2, 3, 1024), (1, 1024), (64, 1024), (65, 1024),
                                     (4, 128, 1024)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_by_default_decode_products_go_to_the_few_row_kernel_and_prefill_ones_to_onednn(layout, x_shape, with_bias):
    """Up to FEW_ROWS_MAX_ROWS rows of a row-major weight: the few-row kernel (no PyTorch product
    runs); more rows, or a column-major weight: oneDNN. Every result is F.linear's."""
    weight, bias, x = _large_product(layout, with_bias, x_shape)
    assert uses_few_rows(tuple(weight.shape), x.dtype, CPU) and prefers_row_major(tuple(weight.shape), x.dtype, CPU)
    expected = F.linear(x, weight, bias)
    out = None

    def compute():
        nonlocal out
        out = linear(x, weight, bias)

    ops = _ops(compute)
    few = x.numel() // 1024 <= linear_module.FEW_ROWS_MAX_ROWS and layout != "column-major"
    assert ("mkldnn::_linear_pointwise" in ops) == (not few and layout != "sliced")
    assert (few_rows.PROFILER_NAME in ops) == few
    assert bool({"aten::addmm", "aten::mm"} & ops) == (not few and layout == "sliced")
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@needs_few_rows
@needs_onednn
def test_opt_125m_sized_weights_go_to_the_few_row_kernel_in_decode_and_to_onednn_in_prefill(fresh_setting):
    """768 x 768 is above the threshold; below it (512 x 512) F.linear takes both."""
    weight, x_few, x_many = torch.randn(768, 768), torch.randn(32, 768), torch.randn(200, 768)
    assert prefers_row_major(tuple(weight.shape), torch.float32, CPU)
    many, few = _ops(lambda: linear(x_many, weight)), _ops(lambda: linear(x_few, weight))
    assert "mkldnn::_linear_pointwise" in many and not {"aten::addmm", "aten::mm"} & many
    assert not {"aten::addmm", "aten::mm", "mkldnn::_linear_pointwise"} & few and few_rows.PROFILER_NAME in few
    torch.testing.assert_close(linear(x_few, weight), F.linear(x_few, weight), rtol=1e-5, atol=1e-4)
    small = torch.randn(512, 512)
    assert not prefers_row_major(tuple(small.shape), torch.float32, CPU)
    assert {"aten::addmm", "aten::mm"} & _ops(lambda: linear(torch.randn(32, 512), small))
    fresh_setting.setenv(linear_module.ENV_VAR, "onednn")
    _forget_setting()
    assert not uses_few_rows(tuple(weight.shape), torch.float32, CPU)
    assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x_few, weight))


@pytest.mark.skipif(not few_rows.available(), reason=f"no few-row kernel: {few_rows.unavailable_reason()}")
def test_on_a_cpu_where_pytorch_runs_avx512_code_onednn_keeps_decode_products(fresh_setting):
    fresh_setting.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    _forget_setting()
    assert not uses_few_rows((2048, 1024), torch.float32, CPU) and uses_onednn((2048, 1024), torch.float32, CPU)
    assert linear_module.describe().endswith("the few-row kernel is off: PyTorch runs AVX512 code on this CPU, "
                                             "where oneDNN's kernels are wider (ATEN_CPU_CAPABILITY=avx2 to use it)")
    x, weight = torch.randn(4, 1024), torch.randn(2048, 1024)
    assert few_rows.PROFILER_NAME not in _ops(lambda: linear(x, weight))


def test_the_summary_line_names_the_kernels_and_why_one_is_off(fresh_setting):
    line = linear_module.describe()
    assert line.startswith("CPU float32 products: ")
    if linear_module.few_rows_enabled():
        assert "few-row kernel (decode)" in line
    else:
        assert f"the few-row kernel is off: {linear_module.few_rows_off_reason()}" in line
    fresh_setting.setenv(linear_module.ENV_VAR, "blas")
    _forget_setting()
    assert linear_module.describe() == f"CPU float32 products: BLAS (the rest) ({linear_module.ENV_VAR}=blas)"


@needs_onednn
def test_the_rest_goes_to_f_linear_unchanged():
    torch.manual_seed(0)
    big, small = torch.randn(2048, 1024), torch.randn(64, 64)
    cases = [
        (torch.randn(4, 64), small),  # too small a weight
        (torch.randn(4, 1024).bfloat16(), big.bfloat16()),  # not float32
        (torch.randn(4, 1024, requires_grad=True), big),  # autograd wanted
    ]
    for x, weight in cases:
        out = None

        def compute():
            nonlocal out
            out = linear(x, weight)

        assert "mkldnn::_linear_pointwise" not in _ops(compute)
        assert torch.equal(out, F.linear(x, weight))
    assert linear(cases[-1][0], big).requires_grad


def test_blas_setting_turns_onednn_off_and_a_bad_one_is_named(fresh_setting):
    fresh_setting.setenv(linear_module.ENV_VAR, "blas")
    assert not uses_onednn((4096, 4096), torch.float32, CPU)
    assert not uses_few_rows((4096, 4096), torch.float32, CPU)
    assert not prefers_row_major((4096, 4096), torch.float32, CPU)
    x, weight = torch.randn(2, 1024), torch.randn(2048, 1024)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    linear_module.onednn_enabled.cache_clear()
    fresh_setting.setenv(linear_module.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match="FLEXGEN_CPU_LINEAR='fast': expected one of auto, onednn, blas"):
        linear(x, weight)


def test_a_bad_setting_stops_the_cli_in_one_line_before_any_work(tmp_path):
    """Named when the engine is built, even for a model too small for any product to ask."""
    out = tmp_path / "out.jsonl"
    env = {**os.environ, linear_module.ENV_VAR: "fast"}
    done = subprocess.run([sys.executable, "-m", "flexgen", "predict", "--config", str(REPO / "configs/quickstart.yaml"),
                           f"output.path={out}"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("FLEXGEN_CPU_LINEAR='fast': expected one of auto, onednn, blas")
    assert "Traceback" not in done.stderr
    assert not out.exists()


@needs_onednn
def test_compute_resident_weights_are_laid_out_for_their_kernel(tiny_checkpoint, monkeypatch):
    """Matrices oneDNN computes stay row-major; those BLAS computes with few rows are column-major."""
    path, _ = tiny_checkpoint
    monkeypatch.setattr(linear_module, "MIN_WEIGHT_ELEMENTS", 64 * 128)  # fc1, fc2 (64 x 128) only
    with load_engine(path, policy=Policy(gpu_batch_size=2), device="cpu", dtype="float32") as engine:
        layer = {p.spec.local: p.parts["data"] for index in (1, 2) for p in engine.placement.layers[index]}
    assert layer["fc1.weight"].is_contiguous() and layer["fc2.weight"].is_contiguous()
    q = layer["self_attn.q_proj.weight"]
    assert q.stride() == (1, q.shape[0])


PLACEMENTS = {"compute": (100, 0), "cpu": (0, 100), "disk": (0, 0)}


@pytest.fixture(params=["onednn", "few-rows"])
def every_product_on(request, fresh_setting):
    """Every product of the tiny checkpoints on oneDNN, or on the few-row kernel (prefill too:
    the prompts below are fewer rows than it takes); the op the profile then shows."""
    if request.param == "onednn":
        if not linear_module.onednn_enabled():
            pytest.skip("this torch build has no oneDNN linear")
        fresh_setting.setenv(linear_module.ENV_VAR, "onednn")
        fresh_setting.setattr(linear_module, "MIN_WEIGHT_ELEMENTS", 0)
        return "mkldnn::_linear_pointwise"
    if not linear_module.few_rows_enabled():
        pytest.skip(f"no few-row kernel here: {linear_module.few_rows_off_reason()}")
    fresh_setting.setattr(linear_module, "MIN_WEIGHT_ELEMENTS", 0)
    return few_rows.PROFILER_NAME


@pytest.mark.parametrize("weights", list(PLACEMENTS))
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_greedy_tokens_equal_hf_with_every_product_on_one_kernel(every_product_on, tmp_path, family, weights):
    prompts = [[2, 15, 16, 17, 18, 19], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14], [2, 53]]
    if family == "opt":
        model = make_checkpoint(tmp_path / "ckpt", "pre_ln")
        pad = 1
    else:
        model = _hf_model("llama")
        model.save_pretrained(tmp_path / "ckpt")
        pad = 0
    expected = hf_greedy(model, prompts, 6, pad_token_id=pad)
    gpu, cpu = PLACEMENTS[weights]
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=gpu, weights_cpu=cpu)
    with load_engine(tmp_path / "ckpt", policy=policy, device="cpu", dtype="float32",
                     offload_dir=tmp_path / "offload") as engine:
        out = None

        def generate():
            nonlocal out
            out = engine.generate(prompts, max_new_tokens=6)

        ops = _ops(generate)
    assert out == expected
    assert "aten::addmm" not in ops and "aten::mm" not in ops
    assert every_product_on in ops


# --------------------------------------------------------------------------- row blocks


@pytest.mark.parametrize("kernel", ["auto", "onednn", "blas"])
@pytest.mark.parametrize("x_shape", [(4, 1024), (2, 3, 1024), (80, 1024)])
def test_row_blocks_equal_the_whole_weight(fresh_setting, kernel, x_shape):
    """A weight handed over as row blocks gives F.linear's result, however many blocks it is cut into."""
    fresh_setting.setenv(linear_module.ENV_VAR, kernel)
    torch.manual_seed(0)
    weight, bias, x = torch.randn(2050, 1024) * 0.03, torch.randn(2050), torch.randn(*x_shape)
    for block_bytes in (linear_module.ROW_BLOCK_BYTES, 7 * 1024 * 4, 1):
        fresh_setting.setattr(linear_module, "ROW_BLOCK_BYTES", block_bytes)
        for b in (bias, None):
            out = linear(x, TensorRows(weight), b)
            assert out.shape == (*x_shape[:-1], 2050)
            torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


class HeldHalf(TensorRows):
    """A half-precision weight handed over as the engine hands over one only converted: held as
    it is, and never to be unpacked where the few-row kernel reads it."""

    def rows_into(self, start, stop, out):
        raise AssertionError("a held half-precision weight was unpacked")

    def held(self):
        return self.tensor


@needs_few_rows
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_shape", [(4, 1024), (2, 3, 1024)])
def test_a_held_half_precision_weight_is_read_without_unpacking(fresh_setting, dtype, x_shape):
    """The same numbers, bit for bit, as unpacking it by blocks into float32; with many rows (no
    few-row kernel) it is unpacked by blocks as before."""
    torch.manual_seed(0)
    weight, bias, x = (torch.randn(2050, 1024) * 0.03).to(dtype), torch.randn(2050), torch.randn(*x_shape)
    for b in (bias, None):
        assert torch.equal(linear(x, HeldHalf(weight), b), linear(x, TensorRows(weight), b))
    with pytest.raises(AssertionError, match="unpacked"):
        linear(torch.randn(80, 1024), HeldHalf(weight))
    fresh_setting.setenv(linear_module.ENV_VAR, "onednn")  # few-row kernel off: blocks again
    _forget_setting()
    with pytest.raises(AssertionError, match="unpacked"):
        linear(x, HeldHalf(weight))


def _blocks_seen(monkeypatch) -> list[tuple[int, int]]:
    seen = []
    by_blocks = linear_module._by_row_blocks

    def spy(x, weight, bias):
        seen.append(weight.shape)
        return by_blocks(x, weight, bias)

    monkeypatch.setattr(linear_module, "_by_row_blocks", spy)
    return seen


@pytest.mark.parametrize("plugins,dtype", [({}, "bfloat16"), ({"weight_compressor": "int4"}, "float32")],
                         ids=["bfloat16-computed-in-float32", "int4"])
@pytest.mark.parametrize("weights", ["cpu", "disk"])
@pytest.mark.parametrize("model", ["opt-125m", "post_ln_proj"])
def test_packed_matrices_are_multiplied_by_row_blocks(monkeypatch, tmp_path, plugins, dtype, weights, model):
    """Matrices kept packed (bfloat16 on a CPU without it, int4) reach their products packed and
    give the tokens of the same weights unpacked whole first (the family's flag off); the tiny
    ``post_ln_proj`` checkpoint has OPT-350M's input and output projections."""
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    if model != "opt-125m":
        make_checkpoint(tmp_path / "ckpt", model)
        model = tmp_path / "ckpt"
    prompts = [[2, 100, 200, 250], [2, 7]]
    policy = Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=100 if weights == "cpu" else 0, pin_weights=False)
    shapes = {}

    def run() -> list[list[int]]:
        with load_engine(model, policy=policy, plugins=plugins, device="cpu", dtype=dtype, threads=1,
                         offload_dir=tmp_path / "offload") as engine:
            assert engine.compute_dtype == torch.float32
            spec = engine.spec
            shapes.update(ffn=(spec.ffn_dim, spec.hidden_size), head=(spec.vocab_size, spec.word_embed_proj_dim))
            return engine.generate(prompts, max_new_tokens=3)

    seen = _blocks_seen(monkeypatch)
    by_blocks = run()
    assert shapes["ffn"] in seen and shapes["head"] in seen
    seen.clear()
    monkeypatch.setattr(OPTFamily, "accepts_row_blocks", False)
    assert run() == by_blocks
    assert set(seen) == {shapes["head"]}  # the output embedding only


@needs_few_rows
@pytest.mark.parametrize("weights", ["cpu", "disk"])
def test_the_engine_hands_bfloat16_weights_to_the_few_row_kernel_as_held(monkeypatch, tmp_path, weights):
    """A bfloat16 model computed in float32: decode's products read the cpu tier's tensors and
    the disk tier's mapped files in bfloat16, with the tokens of the float32-unpacking path."""
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    policy = Policy(gpu_batch_size=2, weights_gpu=0, weights_cpu=100 if weights == "cpu" else 0, pin_weights=False)
    prompts = [[2, 100, 200, 250], [2, 7]]
    seen: list[torch.dtype] = []
    kernel = few_rows.few_rows_linear

    def spy(x, weight, bias, out=None):
        seen.append(weight.dtype)
        return kernel(x, weight, bias, out=out)

    def run() -> list[list[int]]:
        with load_engine("opt-125m", policy=policy, device="cpu", dtype="bfloat16",
                         offload_dir=tmp_path / "offload") as engine:
            return engine.generate(prompts, max_new_tokens=3)

    monkeypatch.setattr(few_rows, "few_rows_linear", spy)
    held = run()
    assert torch.bfloat16 in seen
    monkeypatch.setattr(Unpack, "held", lambda self: None)  # unpack every block instead
    seen.clear()
    assert run() == held and torch.bfloat16 not in seen
