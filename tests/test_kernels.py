"""The native CPU kernels in minicpm/kernels against PyTorch, and their fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minicpm.kernels.linear import KERNEL, MAX_ROWS, linear_bf16


@pytest.mark.parametrize("n,k", [(7, 33), (64, 64), (100, 1000), (1536, 3840)])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_equals_f_linear(n, k, rows, bias):
    assert KERNEL.library() is not None, KERNEL.reason
    g = torch.Generator().manual_seed(n + k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = linear_bf16(x, w, b)
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    # fp32 sums like F.linear's, in another order; the output is rounded to bf16 once
    torch.testing.assert_close(got.float(), exact, rtol=1 / 128, atol=1e-2)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)


def test_bf16_linear_keeps_leading_dims_and_declines_what_it_does_not_serve():
    w = torch.randn(16, 32).bfloat16()
    assert linear_bf16(torch.randn(2, 1, 32).bfloat16(), w, None).shape == (2, 1, 16)
    assert linear_bf16(torch.randn(MAX_ROWS + 1, 32).bfloat16(), w, None) is None  # prefill: oneDNN
    assert linear_bf16(torch.randn(1, 32), w, None) is None                       # fp32 x
    assert linear_bf16(torch.randn(1, 32).bfloat16(), w.t().contiguous().t(), None) is None  # strided W
    trained = torch.nn.Parameter(w.clone())
    assert linear_bf16(torch.randn(1, 32).bfloat16(), trained, None) is None       # autograd


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


CHECK = """
import warnings, torch
warnings.simplefilter("always")
from minicpm.kernels.linear import KERNEL, linear_bf16
from minicpm.kernels.attention import KERNEL as ATTENTION
print(linear_bf16(torch.ones(1, 8).bfloat16(), torch.ones(4, 8).bfloat16(), None), ATTENTION.library())
print("reason:", KERNEL.reason)
"""


def test_switched_off_by_environment():
    out = _python(CHECK, MINICPM_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None None"
    assert "MINICPM_NATIVE=0" in out.stdout and "Warning" not in out.stderr  # asked for: no warning


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    out = _python(CHECK, CC=str(tmp_path / "no-such-cc"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "None None"
    assert "no C compiler" in out.stdout
    assert "native bf16 linear kernel unavailable (no C compiler" in out.stderr
    assert "Traceback" not in out.stderr


def test_build_is_cached_per_machine(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    for _ in range(2):
        out = _python(CHECK, **env)
        assert out.returncode == 0 and "reason: None" in out.stdout, out.stderr
    built = sorted(p.name for p in (tmp_path / "minicpm" / "kernels").rglob("*.so"))
    assert built == ["attention.so", "linear_bf16.so"]  # once each, no temporary files left
    assert not list((tmp_path / "minicpm" / "kernels").rglob(".*"))
