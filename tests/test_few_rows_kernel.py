"""flexgen.kernels: the few-row float32 product equals F.linear for every shape, stride and thread
count it takes, refuses what it cannot take, and its build is cached, and fails with a reason."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexgen.kernels import build as build_module
from flexgen.kernels import few_rows
from flexgen.kernels.build import KernelUnavailable, build

needs_kernel = pytest.mark.skipif(not few_rows.available(), reason=f"no few-row kernel: {few_rows.unavailable_reason()}")
REPO = Path(__file__).resolve().parents[1]


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 33, 64])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 100, 4096 + 24])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 7, 100])
def test_equals_f_linear_for_every_tile_and_tail(threads, m, k, n):
    """Tiles of 4 x 3 and every smaller one, K tails under 8 floats, K over one chunk (4096)."""
    torch.manual_seed(m * 10_000 + k * 10 + n)
    x, weight, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    for count in (1, 2):
        torch.set_num_threads(count)
        for b in (bias, None):
            torch.testing.assert_close(few_rows.few_rows_linear(x, weight, b), F.linear(x, weight, b),
                                       rtol=1e-5, atol=1e-4 * max(1.0, k ** 0.5 / 10))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 4, 33])
@pytest.mark.parametrize("k", [7, 8, 40, 4096 + 24])
@pytest.mark.parametrize("n", [1, 5, 100])
def test_a_half_precision_weight_gives_the_float32_weights_result_bit_for_bit(threads, dtype, m, k, n):
    """Widened exactly as it is loaded, and summed in the same order: the same numbers as the
    float32 copy of the weight, at half the bytes read (and F.linear's, within rounding)."""
    torch.manual_seed(m * 10_000 + k * 10 + n)
    x, weight, bias = torch.randn(m, k), torch.randn(n, k).to(dtype), torch.randn(n)
    assert few_rows.reads(weight)
    for count in (1, 2):
        torch.set_num_threads(count)
        for b in (bias, None):
            got = few_rows.few_rows_linear(x, weight, b)
            assert torch.equal(got, few_rows.few_rows_linear(x, weight.float(), b))
            torch.testing.assert_close(got, F.linear(x, weight.float(), b), rtol=1e-5, atol=1e-4 * max(1.0, k ** 0.5 / 10))


@needs_kernel
def test_strided_operands_and_an_output_inside_a_wider_tensor():
    """x and the weight as column slices of wider tensors, the result written into columns of another."""
    torch.manual_seed(0)
    x_wide, w_wide = torch.randn(6, 300), torch.randn(50, 400)
    x, weight, bias = x_wide[:, 20:276], w_wide[:, 100:356], torch.randn(50)
    y_wide = torch.full((6, 80), 7.0)
    out = few_rows.few_rows_linear(x, weight, bias, out=y_wide[:, 10:60])
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert out.data_ptr() == y_wide[:, 10:].data_ptr()
    assert torch.all(y_wide[:, :10] == 7.0) and torch.all(y_wide[:, 60:] == 7.0)  # nothing outside touched


@needs_kernel
def test_empty_operands_give_empty_results():
    assert few_rows.few_rows_linear(torch.randn(0, 16), torch.randn(5, 16), None).shape == (0, 5)
    assert few_rows.few_rows_linear(torch.randn(3, 16), torch.randn(0, 16), None).shape == (3, 0)


@needs_kernel
@pytest.mark.parametrize("bad", ["dtype", "half-x", "weight-dtype", "layout", "shape", "bias", "out"])
def test_what_the_c_code_cannot_take_is_refused_before_the_call(bad):
    x, weight, bias, out = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8), None
    if bad == "dtype":
        x = x.double()
    elif bad == "half-x":
        x = x.half()
    elif bad == "weight-dtype":
        weight = weight.double()
    elif bad == "layout":
        weight = torch.randn(16, 8).t()  # column-major: unit stride along the wrong dimension
    elif bad == "shape":
        weight = torch.randn(8, 15)
    elif bad == "bias":
        bias = torch.randn(16)[::2]
    else:
        out = torch.empty(8, 4).t()
    with pytest.raises(ValueError, match="few_rows_linear"):
        few_rows.few_rows_linear(x, weight, bias, out=out)


SOURCE = few_rows.SOURCE


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


@needs_kernel
def test_a_build_is_cached_by_content_and_a_changed_source_builds_again(cache, tmp_path, monkeypatch):
    build(SOURCE, few_rows.KERNEL.flags)
    built = sorted(cache.glob("*.so"))
    assert len(built) == 1 and built[0].name.startswith("few_rows-")
    assert not list(cache.glob(".build-*"))  # the scratch folder is gone

    compiled = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        if "-c" in cmd or "-shared" in cmd:
            compiled.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(build_module.subprocess, "run", spy)
    build(SOURCE, few_rows.KERNEL.flags)
    assert compiled == []  # from the cache
    changed = tmp_path / "few_rows.c"
    changed.write_text(SOURCE.read_text() + "\n/* changed */\n")
    header = tmp_path / "vectors.h"
    header.write_text((SOURCE.parent / "vectors.h").read_text())
    build(changed, few_rows.KERNEL.flags)
    assert compiled and len(list(cache.glob("*.so"))) == 2
    compiled.clear()
    header.write_text(header.read_text() + "\n/* changed too */\n")  # the header it includes
    build(changed, few_rows.KERNEL.flags)
    assert compiled and len(list(cache.glob("*.so"))) == 3


def _fake_compiler(tmp_path: Path, script: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "broken", "fails", "none-on-path"])
def test_a_build_that_cannot_happen_says_why_in_a_few_words(cache, tmp_path, monkeypatch, case):
    if case == "missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        expected = "does not run"
    elif case == "broken":
        monkeypatch.setenv("CC", _fake_compiler(tmp_path, "exit 3\n"))
        expected = "does not run (--version exited 3)"
    elif case == "fails":
        monkeypatch.setenv("CC", _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0;; '
                                                          '*) echo "error: no AVX2 here" >&2; exit 1;; esac\n'))
        expected = "compiling few_rows.c failed: error: no AVX2 here"
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        expected = "no C compiler found"
    with pytest.raises(KernelUnavailable, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build(SOURCE, few_rows.KERNEL.flags)
    assert not list(cache.glob("*.so")) and not list(cache.glob(".build-*"))


def test_without_a_compiler_the_engine_falls_back_and_the_summary_says_why(tmp_path):
    """A fresh process that cannot build the kernel computes with oneDNN, and its describe line names the cause."""
    code = ("from flexgen import linear\n"
            "print(linear.few_rows_enabled())\n"
            "print(linear.describe())\n"
            "import torch\n"
            "x, w = torch.randn(4, 1024), torch.randn(1024, 1024)\n"
            "print(torch.allclose(linear.linear(x, w), torch.nn.functional.linear(x, w), atol=1e-4))\n")
    env = {**os.environ, "FLEXGEN_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    enabled, line, close = done.stdout.strip().splitlines()
    assert enabled == "False" and close == "True"
    if few_rows.available():  # on a machine where it could be built, the missing compiler is the reason
        assert "the few-row kernel is off: the C compiler" in line and "does not run" in line
