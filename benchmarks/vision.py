"""MiniCPM-V 2.0 speed and memory: ours against the official remote code, on the same weights.

    python benchmarks/vision.py --threads 2 --repeats 3          (also a section of `make bench`)

Model: MiniCPM-V 2.0's released shape (SigLIP so400m/14 with 26 of its 27 blocks, the resampler
to 64 tokens, the MiniCPM-2B decoder) with seeded random weights, written once as a bf16
checkpoint in the released layout and an int4 copy of it (`minicpm quantize`: decoder int4 group
128, head int8, vision tower bf16), cached in MINICPM_BENCH_CACHE (default
~/.cache/minicpm/bench; ~9 GB). Images: a 448x448 one (a single slice) and a 1344x896 one (an
overview and 3x2 tiles), the same pixels on both sides.

Measured, each engine and precision in a process of its own, on --threads threads:
  encode       the vision tower and resampler over the image's slices (pixel values made
               beforehand): `get_vision_embedding`, as both implementations name it
  first token  a chat turn's first token from the PIL image: slicing and normalising (each
               side's own code), encoding, the embedding merge, the prefill of the prompt (the
               image placeholder + a 20-token question, ids built as the chat prompt lays them
               out) and the first token, greedy
  peak RSS     the process's VmHWM after all of it
Each timing is the best of --repeats runs, after one warm-up encode of the small image.

The peer ("official") is the remote code of openbmb/MiniCPM-V-2 (modeling_minicpmv.py,
resampler.py, modeling_minicpm.py, configuration_minicpm.py) run with transformers 4.40 and timm
0.9.10, which this repository neither ships nor installs. Point at them with
MINICPMV_PEER_PYTHON (a Python with torch, transformers==4.40.0, timm==0.9.10, torchvision,
Pillow) and MINICPMV_PEER_CODE (a folder holding those four files); docs/vision.md says how to
make both. Without them the official rows say so and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGES = {"448x448": (448, 448), "1344x896": (1344, 896)}
# Any ids do for random weights; these avoid the special ones and fit a tiny test vocabulary.
QUESTION = list(range(200, 220))  # 20 question tokens
USER_ID, AI_ID, BOS_ID, NEWLINE_ID = 230, 231, 1, 5  # `<用户>`, `<AI>`, `<s>`, "\n"
SPECIAL_IDS = {"<image>": 101, "</image>": 102, "<unk>": 0, "<slice>": 111, "</slice>": 112, "\n": NEWLINE_ID}
# the released config.json's values (model_type minicpmv; sizes of the vision tower from its name)
RELEASED = {
    "architectures": ["MiniCPMV"], "model_type": "minicpmv", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2304, "intermediate_size": 5760, "num_hidden_layers": 40,
    "num_attention_heads": 36, "num_key_value_heads": 36, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None, "scale_depth": 1.4,
    "scale_emb": 12, "dim_model_base": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 122753, "initializer_range": 0.1, "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
    "query_num": 64, "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_size": 448,
    "slice_mode": True, "drop_vision_last_layer": True, "mm_use_im_start_end": True,
}
STD = 0.02  # random weights small enough that 40 decoder layers stay finite
FLOAT_DIR, INT4_DIR = "minicpmv2-random", "minicpmv2-random-int4"
# (engine, precision) rows; the memory target's row is ours with the int4 decoder
CASES = [("ours", "bf16"), ("official", "bf16"), ("ours", "fp32"), ("official", "fp32"),
         ("ours", "int4 LLM + bf16 vision")]
RSS_TARGET_GB = 3.5


def bench_image(width: int, height: int):
    """A deterministic RGB test image (numpy and Pillow only: the peer's environment makes the
    same one)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    rgb = np.stack([(x * x * 7 + y * 13 + x * y * 5) % 256, (x * 11 + y * y * 3 + (x ^ y) * 17) % 256,
                    ((x + 2 * y) * 29 + (x * y) // 7) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """VmHWM of this process (a fresh process: it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- preparing the checkpoints and prompts (our environment) ----------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("MINICPM_BENCH_CACHE", Path.home() / ".cache" / "minicpm" / "bench"))


def prepare(cache: Path, log=print) -> None:
    """The random bf16 checkpoint and its int4 copy, once (each appears only when complete)."""
    import torch

    from minicpm.formats.hf import save_pretrained
    from minicpm.formats.quantized import quantize_checkpoint
    from minicpm.vision import MiniCPMVConfig, random_minicpmv

    if not (cache / FLOAT_DIR / "config.json").exists():
        start = time.perf_counter()
        config = MiniCPMVConfig.from_hf(RELEASED)
        model = random_minicpmv(config, seed=0, dtype=torch.bfloat16, std=STD, vision_std=STD)
        save_pretrained(model, None, cache / FLOAT_DIR, overwrite=True)
        del model
        log(f"vision: random MiniCPM-V 2.0 bf16 checkpoint in {time.perf_counter() - start:.0f} s")
    if not (cache / INT4_DIR / "config.json").exists():
        start = time.perf_counter()
        quantize_checkpoint(cache / FLOAT_DIR, cache / INT4_DIR, bits=4, group_size=128, head="int8",
                            vision="bf16", overwrite=True, progress=False)
        log(f"vision: int4 copy (minicpm quantize) in {time.perf_counter() - start:.0f} s")


def prompts(config) -> dict[str, dict]:
    """Per image: the chat prompt's ids (`<用户>` placeholder newline question `<AI>`) and the
    image bounds, the same for both engines."""
    import torch

    from minicpm.vision import image_bounds, image_placeholder

    out = {}
    for name, size in IMAGES.items():
        pieces = re.findall(r"</?image>|<unk>|</?slice>|\n", image_placeholder(size, config))
        ids = [BOS_ID, USER_ID, *(SPECIAL_IDS[p] for p in pieces), NEWLINE_ID, *QUESTION, AI_ID]
        bounds = image_bounds(torch.tensor(ids), SPECIAL_IDS["<image>"], SPECIAL_IDS["</image>"])
        out[name] = {"size": size, "ids": ids, "bounds": bounds.tolist()}
    return out


# --- the children: one engine and precision each ------------------------------------------------------
def bench_ours(cache: Path, precision: str, repeats: int, prompt: dict) -> dict:
    import torch

    from minicpm.formats import load_checkpoint
    from minicpm.vision.image import sliced_images, to_pixel_values

    path = cache / (INT4_DIR if precision.startswith("int4") else FLOAT_DIR)
    start = time.perf_counter()
    model, _ = load_checkpoint(path, dtype="float32" if precision == "fp32" else None, device="cpu")
    result = {"load": time.perf_counter() - start}

    def pixels(image):
        return [to_pixel_values(s) for s in sliced_images(image, model.config)[0]]

    def first_token(image, p) -> int:
        cache = model.llm.new_cache(1, len(p["ids"]) + 1)
        logits = model(torch.tensor([p["ids"]]), pixel_values=[pixels(image)],
                       image_bound=[torch.tensor(p["bounds"])], cache=cache, last_only=True)
        return int(logits[0, -1].argmax())

    return {**result, **timings(model, pixels, first_token, repeats, prompt)}


def bench_official(code: Path, cache: Path, precision: str, repeats: int, prompt: dict) -> dict:
    """The official remote code, imported as a package from `code` (run by the peer's Python)."""
    import importlib

    import torch

    sys.path.insert(0, str(code.parent))
    official = importlib.import_module(f"{code.name}.modeling_minicpmv")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    start = time.perf_counter()
    # then .to(dtype), as the model card does: the resampler's pos_embed is made in fp32
    model = official.MiniCPMV.from_pretrained(str(cache / FLOAT_DIR), torch_dtype=dtype,
                                              low_cpu_mem_usage=True).to(dtype=dtype).eval()
    result = {"load": time.perf_counter() - start}
    config = model.config

    def pixels(image):  # what chat() does: get_slice_image_placeholder's slices, transform each
        source, patches, _ = official.slice_image(image, config.max_slice_nums, config.scale_resolution,
                                                  config.patch_size)
        return [model.transform(s) for s in [source] + [tile for row in patches for tile in row]]

    def first_token(image, p) -> int:  # generate(): get_vllm_embedding, then llm.generate
        ids = torch.tensor([p["ids"]])
        data = {"input_ids": ids, "pixel_values": [pixels(image)], "image_bound": [torch.tensor(p["bounds"])],
                "position_ids": torch.arange(ids.shape[1])[None]}
        embeds, _ = model.get_vllm_embedding(data)
        out = model.llm.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False, pad_token_id=0)
        return int(out[0, -1])

    return {**result, **timings(model, pixels, first_token, repeats, prompt)}


def timings(model, pixels, first_token, repeats: int, prompt: dict) -> dict:
    """Encode and first-token times per image, either engine: `pixels(image)` gives its slices'
    pixel values, `first_token(image, prompt)` runs a chat turn's first token."""
    import torch

    result = {}
    with torch.inference_mode():
        model.get_vision_embedding(pixels(bench_image(448, 448)))  # warm-up
        for name, p in prompt.items():
            image = bench_image(*p["size"])
            ready = pixels(image)
            result[f"encode {name}"] = best_of(repeats, lambda: model.get_vision_embedding(ready))
            result[f"first token {name}"] = best_of(repeats, lambda: first_token(image, p))
    return result


def child(engine: str, precision: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    prompt = json.loads(Path(args.prompts).read_text())
    cache = Path(args.cache)
    if engine == "ours":
        result = bench_ours(cache, precision, args.repeats, prompt)
    else:
        result = bench_official(Path(args.peer_code), cache, precision, args.repeats, prompt)
    result["rss"] = peak_rss_mb()
    return result


# --- the parent: every row in a fresh process ---------------------------------------------------------
def peer_setting(args) -> tuple[str, str] | str:
    """(peer Python, official code folder), or why the official rows cannot run."""
    python, code = args.peer_python, args.peer_code
    if not python or not code:
        return "set MINICPMV_PEER_PYTHON and MINICPMV_PEER_CODE (docs/vision.md)"
    if not Path(python).exists():
        return f"MINICPMV_PEER_PYTHON={python} does not exist"
    if not (Path(code) / "modeling_minicpmv.py").exists():
        return f"MINICPMV_PEER_CODE={code} holds no modeling_minicpmv.py"
    return python, code


def memory_short(precision: str) -> str | None:
    """Why an fp32 row would not fit in this machine's free memory now (it needs ~14 GB)."""
    if precision != "fp32":
        return None
    need = 3.43e9 * 4 * 1.1
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
            if available < need:
                return f"needs ~{need / 1e9:.0f} GB free, {available / 1e9:.1f} GB available"
    return None


def run_vision(threads: int = 2, repeats: int = 3, peer_python: str | None = None, peer_code: str | None = None,
               cache: Path | None = None, log=print) -> str:
    """The Markdown section of docs/benchmarks.md."""
    import tempfile

    from minicpm.bench.process import run_child
    from minicpm.vision import MiniCPMVConfig

    cache = cache or cache_dir()
    prepare(cache, log=log)
    peer = peer_setting(argparse.Namespace(peer_python=peer_python, peer_code=peer_code))
    rows = []
    with tempfile.TemporaryDirectory(prefix="minicpm-bench-vision-") as tmp:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts(MiniCPMVConfig.from_hf(RELEASED))))
        for engine, precision in CASES:
            why = peer if engine == "official" and isinstance(peer, str) else memory_short(precision)
            if why:
                rows.append((engine, precision, why))
                continue
            python = peer[0] if engine == "official" else sys.executable
            cmd = [python, __file__, "--case", engine, precision, "--threads", str(threads), "--repeats",
                   str(repeats), "--cache", str(cache), "--prompts", str(prompt_file)]
            if engine == "official":
                cmd += ["--peer-code", peer[1]]
            log(f"vision: {engine} {precision} ...")
            rows.append((engine, precision, run_child(cmd, threads, timeout=3600, width=200)))
    return vision_table(rows, threads, repeats)


def vision_table(rows: list[tuple[str, str, dict | str]], threads: int, repeats: int) -> str:
    from minicpm.bench.machine import machine

    peer = {p: r for e, p, r in rows if e == "official" and isinstance(r, dict)}
    timings = [f"{kind} {image}" for image in IMAGES for kind in ("encode", "first token")]
    lines = [f"## MiniCPM-V 2.0: image encoding and first token ({date.today().isoformat()})", "",
             f"Machine: {machine()}; threads: {threads}; best of {repeats}. Random weights of the released "
             "shape (SigLIP so400m/14, 26 blocks; resampler to 64 tokens; MiniCPM-2B decoder), the same "
             "bf16 checkpoint for both engines; official = the openbmb/MiniCPM-V-2 remote code with "
             "transformers 4.40 + timm 0.9.10. Encode: vision tower + resampler over the image's slices "
             "(448x448: 1 slice; 1344x896: overview + 6 tiles). First token: from the PIL image through "
             "slicing, encoding and the prefill of the chat prompt to the first token. Seconds; "
             "\"x\" = the official time at the same precision / ours.", "",
             "| engine | precision | load s | " + " | ".join(f"{t} s" for t in timings) + " | peak RSS MB |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in timings) + " | ---: |"]
    for engine, precision, r in rows:
        if isinstance(r, str):
            lines.append(f"| {engine} | {precision} | not run: {r} |" + " |" * (len(timings) + 1))
            continue
        base = peer.get(precision) if engine == "ours" else None
        cells = [f"{r[t]:.2f}" + (f" ({base[t] / r[t]:.1f}x)" if base else "") for t in timings]
        lines.append(f"| {engine} | {precision} | {r['load']:.1f} | " + " | ".join(cells) + f" | {r['rss']:.0f} |")
    int4 = next((r for e, p, r in rows if p.startswith("int4") and isinstance(r, dict)), None)
    if int4:
        gb = int4["rss"] * 2**20 / 1e9  # VmHWM is in KiB; the target in GB
        verdict = "under" if gb < RSS_TARGET_GB else "over"
        lines += ["", f"Peak RSS with the int4 decoder and the bf16 vision tower, load + both images' encodes "
                      f"and first tokens: {int4['rss']:.0f} MiB = {gb:.2f} GB ({verdict} the {RSS_TARGET_GB} GB target)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", default=os.environ.get("MINICPMV_PEER_PYTHON"),
                        help="Python of the official code's environment (default $MINICPMV_PEER_PYTHON)")
    parser.add_argument("--peer-code", default=os.environ.get("MINICPMV_PEER_CODE"),
                        help="folder with the official modeling files (default $MINICPMV_PEER_CODE)")
    parser.add_argument("--cache", default=None, help="where the random checkpoints are kept "
                        "(default $MINICPM_BENCH_CACHE or ~/.cache/minicpm/bench)")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats)):
        if value < 1:  # (no minicpm.bench.arguments here: the peer's Python runs this file too)
            parser.error(f"{flag} takes a whole number >= 1, not {value}")
    sys.path.insert(0, str(ROOT))  # our children import minicpm from this checkout (the peer's do not)
    if args.case:
        print(json.dumps(child(*args.case, args)))
        return 0
    print(run_vision(args.threads, args.repeats, args.peer_python, args.peer_code,
                     Path(args.cache) if args.cache else None, log=lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
