"""GPTQ act-order layers: decode speed of the native step against the Python layers and the plain layout.

An act-order GPTQ checkpoint (`desc_act`, the official MiniCPM GPTQ script's setting) scatters
each layer's groups over its input columns; the layer keeps its columns sorted by group and
multiplies x's columns in that order (`QuantizedLinear.input_perm`). The native kernel gathers x
as it quantizes it, so such a model takes the fused native decode step. This script builds a
MiniCPM shape with seeded random weights, makes every decoder Linear int4 (RTN, asymmetric) with
its columns in a random order, and times greedy decode steps for:

  act-order, native step     the fused step (the default)
  act-order, Python layers   model.native_decode = False: each layer a Python call (the path
                             act-order models took before the kernel gathered x)
  plain layout               the same codes without the permutation, native step

The cases run in turn, `--repeats` rounds, the best of each kept. Peak RSS is the process's (VmHWM).

    .venv/bin/python benchmarks/act_order.py [--preset minicpm-2b] [--layers 12] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import copy

import torch

from minicpm.bench.arguments import count
from minicpm.bench.engines import fixed_token_decode_rate
from minicpm.bench.process import peak_rss_mb
from minicpm.config import PRESETS, preset
from minicpm.loading.assemble import random_model
from minicpm.quantization import QuantizedLinear
from minicpm.quantization.linear import quantize_int4


def _replace(model, kind: type, make) -> None:
    """Every decoder module of type `kind` in place by make(name, module)."""
    for name, module in list(model.model.layers.named_modules(prefix="model.layers")):
        if isinstance(module, kind):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, make(name, module))
    model._native = None


INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}


def act_order_int4(model, group: int, seed: int = 0, shared: bool = True) -> None:
    """Every decoder Linear in place as int4 (RTN, `group`) with its columns stored in a random
    order, as an act-order GPTQ layer keeps them. With `shared`, layers that read one input
    (q/k/v, gate/up) get one order, as GPTQ's Hessians give it, held as one tensor, as the
    loaders hold it; else every layer an order of its own."""
    gen = torch.Generator().manual_seed(seed)
    orders: dict[tuple[str, str], torch.Tensor] = {}

    def make(name, linear):
        parent, _, leaf = name.rpartition(".")
        key = (parent.rpartition(".")[0], INPUTS.get(leaf, leaf) if shared else leaf)
        if key not in orders:
            orders[key] = torch.randperm(linear.in_features, generator=gen)
        perm = orders[key]
        q, scales, zeros = quantize_int4(linear.weight.detach()[:, perm], group)
        dtype = linear.weight.dtype
        return QuantizedLinear(linear.in_features, linear.out_features, 4, group, q, scales.to(dtype),
                               zeros.to(dtype), input_perm=perm)
    _replace(model, torch.nn.Linear, make)


def without_permutation(model) -> None:
    """The same codes and metadata, taken as multiplying x's columns in order."""
    def make(name, layer):
        scales, zeros = layer.scales_zeros()
        return QuantizedLinear(layer.in_features, layer.out_features, 4, layer.group_size, layer.codes(),
                               scales, zeros)
    _replace(model, QuantizedLinear, make)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="minicpm-2b", choices=sorted(n for n in PRESETS if "moe" not in n),
                   help="a dense shape (an MoE's router is a Linear this script would quantize too)")
    p.add_argument("--layers", type=count(1, "--layers"), default=12, help="decoder layers (the preset's are many GB)")
    p.add_argument("--vocab", type=count(1024, "--vocab"), default=8192, help="vocabulary: a small head keeps the layers' share visible")
    p.add_argument("--group", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="GPTQ checkpoints load in float32 unless told otherwise")
    p.add_argument("--threads", type=count(1, "--threads"), default=2)
    p.add_argument("--prompt", type=count(1, "--prompt"), default=32)
    p.add_argument("--new", type=count(1, "--new"), default=32, help="timed decode steps")
    p.add_argument("--repeats", type=count(1, "--repeats"), default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset, num_hidden_layers=args.layers, vocab_size=args.vocab)
    widths = {config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim}
    if any(width % args.group for width in widths):
        p.error(f"--group {args.group} does not divide the {args.preset} layers' input widths "
                f"({', '.join(map(str, sorted(widths)))}); pass --group 32")
    dtype = getattr(torch, args.dtype)
    print(f"building the {args.preset} shape ({args.layers} layers, vocabulary {args.vocab}, {args.dtype}, "
          f"int4 g{args.group}, seeded random weights)...", flush=True)
    permuted = random_model(config, dtype=dtype, std=0.02)
    act_order_int4(permuted, args.group)
    plain = copy.deepcopy(permuted)
    without_permutation(plain)
    ids = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    cases = {"act-order, native step": (permuted, True), "act-order, Python layers": (permuted, False),
             "plain layout, native step": (plain, True)}
    best = dict.fromkeys(cases, 0.0)
    for _ in range(args.repeats):  # the cases in turn, so that a slower minute hits them all
        for name, (model, native) in cases.items():
            model.native_decode = native
            best[name] = max(best[name], fixed_token_decode_rate(model, ids, args.new))
    base = best["plain layout, native step"]
    print(f"\n| case | tok/s | vs plain layout |\n| --- | ---: | ---: |")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    print(f"\npeak RSS {peak_rss_mb():,.0f} MB (VmHWM), {args.threads} threads")


if __name__ == "__main__":
    main()
