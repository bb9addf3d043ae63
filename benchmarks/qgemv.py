"""Weight-only GEMV/GEMM microbenchmark: native int4/int8 kernel vs PyTorch's packed kernels vs bf16.

For the MiniCPM-1B and -2B layer shapes, prints per projection shape µs per call and GB/s of the
bytes the layer reads (codes + scales/zeros, or bf16 weights):
  M=1    decode; every call reads a distinct copy of the weights, cycling through more than
         --mb MB (default 600) so that the 32 MB L3 does not flatter the numbers
  M=512  prefill, one warm matrix per shape (compute bound), also as GMAC/s
and an estimate of one decode step's GEMV time for the whole model (layers x 7 projections +
the int8 head). M=1: 10th percentile of single calls; M=512: best of passes (the machine is shared).

    .venv/bin/python benchmarks/qgemv.py [--model 1b|2b|all] [--threads 2] [--mb 600] [--no-prefill]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

from minicpm.bench.arguments import count
from minicpm.config import preset
from minicpm.kernels import qgemm as native
from minicpm.quantization import QuantizedLinear


def family_shape(name: str) -> tuple[int, int, int, int, int, int]:
    """hidden, intermediate, heads, kv heads, layers, vocab of a family preset."""
    c = preset(name)
    return (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers, c.vocab_size)


MODELS = {"1b": family_shape("minicpm-1b"), "2b": family_shape("minicpm-2b")}
VARIANTS = ("native int4", "native int8", "torch int4", "torch int8", "bf16")


def projections(model: str) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one decoder layer."""
    h, inter, heads, kv, _, _ = MODELS[model]
    d = h // heads
    return [("q", h, h), ("k", kv * d, h), ("v", kv * d, h), ("o", h, h),
            ("gate", inter, h), ("up", inter, h), ("down", h, inter)]


@contextlib.contextmanager
def native_kernel(enabled: bool):
    """Make QuantizedLinear pick (or skip) the native kernel for layers built inside."""
    saved = native.available
    if not enabled:
        native.available = lambda: False
    try:
        yield
    finally:
        native.available = saved


def make_layer(variant: str, n: int, k: int, group: int) -> nn.Module:
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    if variant == "bf16":
        return linear.requires_grad_(False)
    bits = 4 if "int4" in variant else 8
    with native_kernel(variant.startswith("native")):
        layer = QuantizedLinear.from_float(linear, bits, group if bits == 4 else None)
    want = "native" if variant.startswith("native") else "packed"
    assert layer.kernel == want, (variant, layer.kernel, native.reason())
    return layer


def layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(layer.buffers()) + list(layer.parameters()))


def copies(layer: nn.Module, count: int) -> list[nn.Module]:
    """Distinct copies (their own memory) of one layer: same numbers, no cache reuse across them.

    Native layers are rebuilt from their checkpoint form, so that their weights sit in huge-page
    memory as a loaded model's do (a deepcopy would land in PyTorch's ordinary allocations).
    """
    import copy
    if isinstance(layer, QuantizedLinear) and layer.kernel == "native":
        state = layer.portable_state()
        return [layer] + [QuantizedLinear.from_quantized(state["qweight"], state["scales"], state.get("zeros"),
                                                         layer.bits, layer.group_size, state.get("bias"),
                                                         dtype=layer.dtype) for _ in range(count - 1)]
    return [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]


def decode(variant: str, shapes, group: int, mb: float, repeat: int) -> dict[str, tuple[float, float]]:
    """{name: (µs per call, GB/s)} at M=1 over a weight set larger than `mb` MB.

    Every call is timed on its own and the 10th percentile over all copies and passes is kept:
    each call reads weights no other call has left in cache, so this is a cold call on a moment
    when the shared machine let it run, rather than a pass that some other process interrupted.
    """
    one = {name: make_layer(variant, n, k, group) for name, n, k in shapes}
    per_set = sum(layer_bytes(m) for m in one.values())
    count = max(1, int(mb * 1e6 / per_set) + 1)
    sets = [dict(zip(one, layers)) for layers in zip(*(copies(m, count) for m in one.values()))]
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for _, _, k in shapes}
    times = {name: [] for name, _, _ in shapes}
    with torch.inference_mode():
        for _ in range(repeat):
            for layers in sets:
                for name, n, k in shapes:
                    x, layer = xs[k], layers[name]
                    t = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - t)
    best = {name: sorted(ts)[len(ts) // 10] for name, ts in times.items()}
    return {name: (best[name] * 1e6, layer_bytes(one[name]) / best[name] / 1e9) for name in best}


def prefill(variant: str, shapes, group: int, m: int, repeat: int) -> dict[str, tuple[float, float]]:
    """{name: (ms per call, GMAC/s)} at M=m, warm."""
    out = {}
    with torch.inference_mode():
        for name, n, k in shapes:
            layer = make_layer(variant, n, k, group)
            x = torch.randn(m, k, dtype=torch.bfloat16)
            layer(x)
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                layer(x)
                best = min(best, time.perf_counter() - t)
            out[name] = (best * 1e3, m * n * k / best / 1e9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["1b", "2b", "all"], default="all")
    parser.add_argument("--threads", type=count(1, "--threads"), default=2)
    parser.add_argument("--group", type=int, choices=(32, 64, 128), default=128, help="int4 group size")
    parser.add_argument("--mb", type=float, default=600, help="MB of weights cycled through at M=1")
    parser.add_argument("--repeat", type=count(1, "--repeat"), default=5)
    parser.add_argument("--prefill-m", type=count(1, "--prefill-m"), default=512)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",")]
    print(f"threads {args.threads}, int4 group {args.group}, native: {native.available()} "
          f"{native.reason() or ''}")
    for model in (["1b", "2b"] if args.model == "all" else [args.model]):
        h, inter, _, _, n_layers, vocab = MODELS[model]
        shapes = projections(model)
        if args.no_decode:
            variants_decode = []
        else:
            variants_decode = variants
            print(f"\n== MiniCPM-{model.upper()}: M=1, weights cycled through > {args.mb:.0f} MB "
              f"(µs per call / GB/s of weight bytes)")
            print(f"{'variant':<12}" + "".join(f"{f'{name} {n}x{k}':>22}" for name, n, k in shapes)
                  + f"{'layer µs':>10}{f'head {vocab}x{h}':>24}{'step ms':>9}")
        for variant in variants_decode:
            res = decode(variant, shapes, args.group, args.mb, args.repeat)
            # the head stays int8 in an int4 model (and bf16 in a bf16 one)
            head_variant = variant.replace("int4", "int8")
            head = decode(head_variant, [("head", vocab, h)], args.group, args.mb, args.repeat)
            layer_us = sum(us for us, _ in res.values())
            head_us, head_gbs = head["head"]
            step = (n_layers * layer_us + head_us) / 1e3
            print(f"{variant:<12}" + "".join(f"{f'{us:.0f} / {gbs:.1f}':>22}" for us, gbs in res.values())
                  + f"{layer_us:>10.0f}{f'{head_us:.0f} / {head_gbs:.1f}':>24}{step:>9.1f}")
        if args.no_prefill:
            continue
        print(f"\n== MiniCPM-{model.upper()}: M={args.prefill_m} prefill (ms per call / GMAC/s)")
        print(f"{'variant':<12}" + "".join(f"{f'{name} {n}x{k}':>22}" for name, n, k in shapes)
              + f"{'layer ms':>10}{'tok/s*':>8}")
        for variant in variants:
            res = prefill(variant, shapes, args.group, args.prefill_m, max(2, args.repeat // 2))
            layer_ms = sum(ms for ms, _ in res.values())
            print(f"{variant:<12}" + "".join(f"{f'{ms:.1f} / {g:.0f}':>22}" for ms, g in res.values())
                  + f"{layer_ms:>10.1f}{args.prefill_m / (layer_ms * n_layers / 1e3):>8.0f}")
        print("* projections only, no attention or head")


if __name__ == "__main__":
    main()
