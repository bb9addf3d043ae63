"""The native kernels, one `Kernel` per C file, in one list: the setup that declares each one's
signatures and checks a build against PyTorch (in the module that uses it), and its own compiler
flags. All need AVX2, FMA and F16C at least (see avx512_on_avx2.h); where the CPU has AVX-512
(VNNI, BF16) they compile to those instructions instead.
"""

from __future__ import annotations

import functools

from minicpm.kernels.build import Kernel, prebuild

QGEMM = Kernel("qgemm", "int4/int8 kernel", "minicpm.kernels.qgemm:setup")
ATTENTION = Kernel("attention", "attention kernel", "minicpm.kernels.attention:setup")
# No FMA contraction: a*b + c*d must round twice, as PyTorch's separate ops do.
DECODE = Kernel("decode", "decode step kernel", "minicpm.kernels.decode:setup", extra_flags=("-ffp-contract=off",))
LINEAR_BF16 = Kernel("linear_bf16", "bf16 linear kernel", "minicpm.kernels.linear:setup_bf16")
LINEAR_F32 = Kernel("linear_f32", "fp32 linear kernel", "minicpm.kernels.linear:setup_f32")
DROPOUT = Kernel("dropout", "dropout kernel", "minicpm.kernels.dropout:setup")
# No FMA contraction: bitwise the Python expression's separate products and sums.
ROTARY = Kernel("rotary", "rotary embedding kernel", "minicpm.kernels.rotary:setup", extra_flags=("-ffp-contract=off",))

# first needed first: the int4/int8 products are built while a quantized checkpoint loads
ALL = (QGEMM, ATTENTION, DECODE, LINEAR_F32, LINEAR_BF16, ROTARY)  # DROPOUT: training only, built on its first use


@functools.cache
def prebuild_once() -> None:
    """Start building every kernel missing from the cache (once per process; see build.prebuild)."""
    prebuild(ALL)
