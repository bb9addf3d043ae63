"""decode.c's C interface: the structs a decode step is described by, and the ABI numbers of
the kernels it calls. No PyTorch: the PyTorch model (`decode.NativeDecoder`) and the torch-free
runtime (`minicpm.lean`) describe their layers with the same structs.
"""

from __future__ import annotations

import ctypes

from minicpm.kernels.build import KernelUnavailable

ABI = 9
ATTENTION_ABI = 10  # attention.c's, whose minicpm_decode_attention_team (and chunk_attention_team) the step calls
DT_F32, DT_BF16 = 0, 1  # decode.c's DT_*: also qgemm's and attention's codes
P_QGEMM, P_STREAM = 0, 1  # a projection's kernel: a qgemm plan, or a float weight streamed
MAX_TOP_K = 64
_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class Proj(ctypes.Structure):
    _fields_ = [("fn", _ptr), ("plan", _ptr), ("w", _ptr), ("bias", _ptr), ("n", _i64), ("k", _i64),
                ("kind", _i64)]


class Layer(ctypes.Structure):
    _fields_ = ([("norm1", _ptr), ("norm2", _ptr)]
                + [(name, Proj) for name in ("q", "k", "v", "o", "gate", "up", "down", "router")]
                + [("experts", _ptr), ("top_k", _i64), ("kstore", _ptr), ("vstore", _ptr), ("kscale", _ptr),
                   ("vscale", _ptr), ("ktail", _ptr), ("down_rows", _ptr), ("all_neurons", _i64)])


class Step(ctypes.Structure):
    _fields_ = ([(name, _i64) for name in ("batch", "hidden", "heads", "kv_heads", "head_dim", "inter", "slots",
                                            "max_len", "len", "dtype", "kv_bits", "act", "threads")]
                + [(name, _f32) for name in ("eps", "residual_scale", "threshold", "softmax_scale")]
                + [(name, _ptr) for name in ("cos", "sin", "rows", "positions", "starts", "ends", "mask",
                                             "attention", "qscratch", "chunk_attention", "chunk_floats")]
                + [("kv_fp16", _i64)])


def declare(lib: ctypes.CDLL) -> None:
    """Check a decode.c build's ABI and declare its entry point."""
    if lib.minicpm_decode_abi() != ABI:
        raise KernelUnavailable("decode.c: stale build")
    lib.minicpm_decode_layers.argtypes = [ctypes.POINTER(Step), ctypes.POINTER(Layer), _i64, _ptr]
    lib.minicpm_decode_layers.restype = ctypes.c_int
