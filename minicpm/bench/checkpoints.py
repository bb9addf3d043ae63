"""The benchmark's checkpoints: seeded random weights of a family shape, written once in every
form an engine loads (our bf16 and int8/int4 directories, a llama-format directory, GGUF files)."""

from __future__ import annotations

import time
from pathlib import Path

from minicpm.bench.cases import CTX, GGUF_Q4_0, NEW_TOKENS, PROMPT_TOKENS, QUANTIZED, SEED

STD = 0.02  # small, so that activations stay finite through 52 layers of random matrices


def random_tensors(config, seed: int = SEED):
    """(name, bf16 tensor) for every checkpoint tensor of a seeded random model of `config`.

    `random_model` converts each tensor to bf16 as it is drawn, so the largest transient is one
    fp32 tensor, never an fp32 model.
    """
    import torch

    from minicpm.formats.hf import checkpoint_state_dict
    from minicpm.loading.assemble import random_model

    model = random_model(config, seed=seed, dtype=torch.bfloat16, std=STD)
    return checkpoint_state_dict(model).items()


def bench_tokenizer():
    """The default model's tokenizer: any real vocabulary will do for random weights (llama.cpp
    needs one in the GGUF; spare embedding rows are named as padding by write_gguf)."""
    from minicpm.formats.gguf import open_gguf
    from minicpm.loading import default_model_path
    from minicpm.tokenizer import Tokenizer

    _, _, meta = open_gguf(default_model_path())
    return Tokenizer.from_gguf_metadata(meta)


def prepare(shape: str, workdir: Path, gguf_types=("f16", "q8_0", "q4_0"), log=print,
            quantized=tuple(QUANTIZED)) -> None:
    """Write `shape`'s random checkpoint as hf/ (bf16), ours-<int8|int4>/, llama/ (bf16) and
    model-<type>.gguf."""
    from minicpm.config import preset
    from minicpm.formats.gguf import write_gguf
    from minicpm.formats.hf import save_pretrained
    from minicpm.formats.llama import to_llama

    tokenizer = bench_tokenizer()
    config = preset(shape, torch_dtype="bfloat16")
    if tokenizer.vocab_size > config.vocab_size:  # tiny test shapes: GGUF needs a row per token
        config = config.replace(vocab_size=tokenizer.vocab_size)
    if config.max_position_embeddings < max(PROMPT_TOKENS + NEW_TOKENS, CTX):  # tiny shapes again
        config = config.replace(max_position_embeddings=max(PROMPT_TOKENS + NEW_TOKENS, CTX))
    start = time.perf_counter()
    state = dict(random_tensors(config))  # bf16 only: ~2.7 GB for 1B, ~5.5 GB for 2B
    save_pretrained(None, None, workdir / "hf", config=config, state_dict=state, overwrite=True)
    log(f"  {shape}: random bf16 checkpoint in {time.perf_counter() - start:.0f} s")
    if quantized:
        prepare_quantized(workdir, quantized, log=lambda m: log(f"  {shape}: {m}"))
    for gguf_type in gguf_types:
        start = time.perf_counter()
        write_gguf(config, state.items(), tokenizer, workdir / f"model-{gguf_type}.gguf",
                   file_type=gguf_type, name=f"random {shape}")
        log(f"  {shape}: {gguf_type} GGUF in {time.perf_counter() - start:.0f} s")
    llama_config, llama_state = to_llama(config, state)
    del state  # the folded copy replaces it: never two models in memory for long
    save_pretrained(None, None, workdir / "llama", config=llama_config, state_dict=llama_state,
                    overwrite=True)


def prepare_quantized(workdir: Path, precisions=tuple(QUANTIZED), log=print) -> None:
    """ours-<precision>/ from hf/ by the streaming quantize_checkpoint, as `minicpm quantize`
    does."""
    from minicpm.formats.quantized import quantize_checkpoint

    for precision in precisions:
        start = time.perf_counter()
        bits, head = QUANTIZED[precision]
        quantize_checkpoint(workdir / "hf", ours_path(workdir, precision), bits=bits, group_size=128, head=head,
                            overwrite=True, progress=False)
        log(f"{precision} checkpoint (streaming quantize_checkpoint) in "
            f"{time.perf_counter() - start:.0f} s")


def ours_path(workdir: Path, precision: str) -> Path:
    """Where `prepare` wrote what we load for `precision` (the q4_0 GGUF is llama.cpp's file)."""
    if precision == GGUF_Q4_0:
        return workdir / "model-q4_0.gguf"
    return workdir / ("hf" if precision == "bf16" else "ours-" + precision.replace(", ", "-").replace(" ", "-"))


def prepared(workdir: Path) -> bool:
    """Whether `prepare` wrote everything into `workdir` (a bench run can reuse it)."""
    from minicpm.bench.cases import CASES, MEMORY_CASES, checkpoint_and_kv

    ours = {ours_path(workdir, checkpoint_and_kv(p)[0]) for e, p in CASES + MEMORY_CASES if e in ("ours", "lean")}
    ggufs = {workdir / f"model-{p}.gguf" for e, p in CASES if e == "llama.cpp"}
    return all(path.exists() for path in ours | ggufs | {workdir / "llama" / "config.json"})


def layer_shared_tensors(config, seed: int = SEED):
    """(name, bf16 tensor) for every checkpoint tensor of `config`, drawn as `random_tensors`
    draws them, except that every decoder layer holds the same tensor objects as layer 0.

    For shapes whose bf16 model does not fit in memory (MiniCPM-MoE-8x2B: 27 GB): only one layer
    and the embedding are ever held, while each file written from them still stores every layer
    in full (a speed measurement reads them all, as it would distinct weights).
    """
    import re

    import torch

    from minicpm.formats.hf import checkpoint_state_dict
    from minicpm.loading.assemble import random_value
    from minicpm.model import MiniCPMForCausalLM

    with torch.device("meta"):
        shapes = {n: t.shape for n, t in checkpoint_state_dict(MiniCPMForCausalLM(config)).items()}
    gen = torch.Generator().manual_seed(seed)
    first: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        key = re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", name)
        if key not in first:
            first[key] = random_value(name, shape, gen, STD).to(torch.bfloat16)
        yield name, first[key]


def prepare_layer_shared(config, workdir: Path, precision: str = "int4", gguf: bool = True, log=print) -> None:
    """ours-<precision>/ (int4 layers in groups of 128; `QUANTIZED` names the head) and, with
    `gguf`, model-q4_0.gguf from `layer_shared_tensors(config)`, written straight from the stream:
    no bf16 checkpoint on disk."""
    from minicpm.formats.gguf import write_gguf
    from minicpm.formats.quantized import write_quantized
    from minicpm.quantization import make_spec, quantize_tensors

    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bits, head = QUANTIZED[precision]
    quantized_config, stream = quantize_tensors(
        config, layer_shared_tensors(config), make_spec(bits, 128, head, "head", "rtn"), source="random")
    write_quantized(ours_path(workdir, precision), quantized_config, stream, None, source="random")
    log(f"  {precision} checkpoint in {time.perf_counter() - start:.0f} s")
    if gguf:
        start = time.perf_counter()
        write_gguf(config, layer_shared_tensors(config), bench_tokenizer(), workdir / "model-q4_0.gguf",
                   file_type="q4_0", name="random, layers shared", progress=True)
        log(f"  q4_0 GGUF in {time.perf_counter() - start:.0f} s")
