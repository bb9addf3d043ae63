"""MiniCPM-S sparse MLP: decode speed of the native step against the dense MLP, by sparsity.

MiniCPM-S-1B (ProSparse) uses FATReLU: act(z) = z where z > threshold, else 0. The project news
reports 87.89% of its FFN activations zero on average. The native decode step (decode.c
`sparse_mlp`) computes the gate's product, lists each row's active neurons and reads only their
rows of up and of down's transpose. This script builds the MiniCPM-S-1B shape with seeded random
weights (bf16 by default), sets FATReLU's threshold to the quantile of the gate outputs that
gives each target sparsity (random weights have no trained gate statistics: the threshold is
what makes a share of them zero), and times greedy decode steps for:

  sparse          the native step, active neurons only (model.sparse_mlp, the default)
  every neuron    the same kernel reading every neuron's rows (model.sparse_mlp = False)
  dense products  down's weight stored [hidden, intermediate] (as a SiLU model's), the step's
                  streamed dense products: the path before the sparse MLP

and prints tok/s, the realized sparsity (measured on the prompt by the Python layers), the bytes a
step reads and the rate that makes. Peak RSS is the process's (VmHWM).

    .venv/bin/python benchmarks/sparse_mlp.py [--sparsity 0.5,0.8,0.8789,0.95] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from minicpm.bench.arguments import count
from minicpm.bench.engines import fixed_token_decode_rate
from minicpm.bench.process import peak_rss_mb
from minicpm.config import preset
from minicpm.loading.assemble import random_model
from minicpm.model import _activation

RELEASED = 0.8789  # MiniCPM-S-1B's reported average FFN sparsity


def sparsities(spec: str) -> list[float]:
    """Target sparsities, comma-separated, each strictly between 0 and 1."""
    try:
        values = [float(part) for part in spec.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"--sparsity takes numbers between 0 and 1 such as 0.5,{RELEASED}, not {spec!r}")
    return values


def gate_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's gate outputs over the prompt (Python layers)."""
    seen, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.mlp.gate_proj.register_forward_hook(lambda m, a, out: seen.append(out.float().flatten())))
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def set_threshold(model, threshold: float) -> None:
    model.config.hidden_act_param = threshold
    for layer in model.model.layers:
        layer.mlp.act = _activation(model.config)
    model._native = None  # the step reads the threshold when it is built


def threshold_for(model, ids: torch.Tensor, sparsity: float) -> tuple[float, float]:
    """The threshold whose zeros are `sparsity` of all gate outputs, and the sparsity it then
    gives with every layer's input following from it."""
    outputs = torch.cat(gate_outputs(model, ids))
    sample = outputs[torch.randperm(len(outputs), generator=torch.Generator().manual_seed(0))[:1 << 22]]
    threshold = float(torch.quantile(sample, sparsity))
    set_threshold(model, threshold)
    realized = torch.cat([(out <= threshold).float() for out in gate_outputs(model, ids)]).mean().item()
    return threshold, realized


def step_bytes(model, active: float) -> float:
    """Weight bytes one decode step reads: every projection and the head, up and down for the
    active share of the neurons only."""
    c = model.config
    size = model.dtype.itemsize
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    attention = h * (2 * h + 2 * kv)
    mlp = h * f * (1 + 2 * active)
    return size * (c.num_hidden_layers * (attention + mlp) + c.vocab_size * h)


def store_down(model, rows: bool) -> None:
    """down's weight as one row per neuron (what MLP keeps for FATReLU), or [hidden, intermediate]."""
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        w.data = w.data.t().contiguous().t() if rows else w.data.contiguous()
    model._native = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=sparsities, default=f"0.5,0.8,{RELEASED},0.95",
                   help="target sparsities, comma-separated")
    p.add_argument("--threads", type=count(1, "--threads"), default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompt", type=count(1, "--prompt"), default=128, help="prompt tokens before the timed steps")
    p.add_argument("--new", type=count(1, "--new"), default=32, help="timed decode steps")
    p.add_argument("--repeats", type=count(1, "--repeats"), default=4, help="rounds over the cases; the best of each is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"building the MiniCPM-S-1B shape ({args.dtype}, seeded random weights)...", flush=True)
    model = random_model(preset("minicpm-s-1b"), dtype=dtype, std=0.02)
    ids = torch.randint(0, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    rows = []
    for target in args.sparsity:
        threshold, realized = threshold_for(model, ids, target)
        cases = [("sparse", True, True), ("every neuron", True, False)]
        if target == RELEASED:
            cases.append(("dense products", False, False))
        best = dict.fromkeys(cases, 0.0)
        for _ in range(args.repeats):  # the cases in turn, so that a slower minute hits them all
            for name, as_rows, sparse in cases:
                store_down(model, as_rows)
                model.sparse_mlp = sparse
                rate = fixed_token_decode_rate(model, ids, args.new)
                best[name, as_rows, sparse] = max(best[name, as_rows, sparse], rate)
        for (name, as_rows, sparse), rate in best.items():
            gb = step_bytes(model, 1 - realized if sparse else 1.0) * rate / 1e9
            rows.append((target, realized, threshold, name, rate, gb))
            print(f"  sparsity {realized:.4f} (threshold {threshold:+.4f}) {name:>14}: {rate:6.2f} tok/s, "
                  f"{gb:5.1f} GB/s of weights", flush=True)
        store_down(model, True)
    dense = next((r[4] for r in rows if r[3] == "dense products"), None)
    print("\n| target sparsity | realized | case | decode tok/s | vs every neuron | vs dense products "
          "| weights read GB/s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for target, realized, threshold, name, rate, gb in rows:
        base = next(r[4] for r in rows if r[0] == target and r[3] == "every neuron")
        versus = "" if dense is None else f"{rate / dense:.2f}x"
        print(f"| {target:.4f} | {realized:.4f} | {name} | {rate:.2f} | {rate / base:.2f}x | {versus} | {gb:.1f} |")
    print(f"\npeak RSS (VmHWM): {peak_rss_mb():.0f} MiB, {args.threads} threads, prompt {args.prompt}, "
          f"{args.new} timed steps, best of {args.repeats} rounds")


if __name__ == "__main__":
    main()
