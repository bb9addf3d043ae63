"""The quantization report: our RTN, GPTQ and AWQ at 4 and 8 bits beside llama.cpp's own
quantizations of the same weights (Q4_0, Q4_K_M, Q4_K_M with an importance matrix, Q8_0), on real
trained weights, in one run.

For each model and each quantization: WikiText-2 test perplexity by both protocols (ours:
`minicpm eval ppl`; llama.cpp's files also by `llama-perplexity`, its own protocol), size on disk,
bits per weight, the quantizer's wall time and peak RSS (`/usr/bin/time -v`), and decode tok/s
(greedy, batch 1, the same threads; ours by `TokenGenerator`, llama.cpp's files by
llama-cpp-python). Every command the table rests on is printed, so each number can be recomputed.

Models:
  smollm2  SmolLM2-135M-Instruct, the default model. Its only weights are a Q4_1 GGUF, so "float"
           is that file dequantized (every weight already on a 16-level grid per 32 columns): both
           tools start from the same float32 weights (ours reads the GGUF, llama.cpp an f32 GGUF
           we write from it), but the gaps are smaller than those of weights never quantized.
  base     the small MiniCPM pretrained by runs/quant_base.py (bf16, never quantized; its widths
           are multiples of 256, so llama.cpp's k-quants apply to every layer).

Calibration (ours and llama-imatrix alike): WikiText-2's validation split, SAMPLES windows of
SEQLEN tokens (ours at seeded random offsets, llama-imatrix its first SAMPLES chunks).

    .venv/bin/python benchmarks/quantization.py [--models smollm2,base] [--samples 32] [--seqlen 512]
        [--windows 16] [--chunks 64] [--threads 2] [--keep DIR] [--reuse] [--write-doc]

Each model's results are saved in --keep (`base.json`, `smollm2.json`); --reuse keeps the rows saved
there and measures only the missing ones (so the models, or a new row, can be measured in separate
sittings), --write-doc puts the tables into docs/quantization.md between its report markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from minicpm.bench.arguments import count, folder
from minicpm.bench.machine import machine
from minicpm.bench.process import llama_tools, measure_here, run_child

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
DOC = ROOT / "docs" / "quantization.md"
MARKERS = ("<!-- quantization report: start -->", "<!-- quantization report: end -->")
WIKI = ROOT / "minicpm" / "evaluation" / "data"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# (method, bits, int4 group size, extra flags of `minicpm quantize`); GPTQ's defaults are act-order and the
# range search, its fourth row the reference's defaults; g32 shows what smaller groups buy (its scales and
# zeros cost 1 bit per weight from a bf16 source, 2 from a float32 one such as SmolLM2's dequantized GGUF)
OURS = [("rtn", 4, 128, ()), ("gptq", 4, 128, ()), ("gptq", 4, 128, ("--no-mse",)),
        ("gptq", 4, 128, ("--no-act-order", "--no-mse")), ("awq", 4, 128, ()),
        ("rtn", 4, 32, ()), ("gptq", 4, 32, ()),
        ("rtn", 8, None, ()), ("gptq", 8, None, ()), ("awq", 8, None, ())]
# RTN must move perplexity by this share of float's for "recovered" (and the comparison with llama.cpp)
# to mean anything: a model whose int4 rows all sit within it does not tell the methods apart
MIN_SHIFT = 0.01
LLAMA = [("Q4_0", False), ("Q4_K_M", False), ("Q4_K_M", True), ("Q8_0", False)]
BASE = Path.home() / ".cache" / "minicpm" / "bench" / "quant-base" / "model"
NEW_TOKENS, PROMPT = 128, 64
# one 128-token run is half a second for SmolLM2 and a tenth for the base model: single runs once put two
# identical layouts 17% apart, medians of 3 runs of the base model 28%
DECODE_RUNS = 5


# --- commands, timed -------------------------------------------------------------------------------
def shown(cmd: list) -> str:
    text = " ".join(str(c) for c in cmd)
    return text.replace(str(VENV / "bin") + "/", "").replace(str(Path.home()), "~")


def timed_command(cmd: list, log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds and the OS's peak RSS (MiB); its output goes to
    `log`. A failure stops the report with the command's last lines."""
    stats = log.with_suffix(".time")
    print("$ " + shown(cmd), flush=True)
    with open(log, "w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", "-o", str(stats), *map(str, cmd)], stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        sys.exit(f"error: `{shown(cmd)}` failed ({rc}):\n{tail}")
    text = stats.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"seconds": seconds, "rss": rss, "command": shown(cmd)}


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all tensors, of the decoder layers' tensors): no tokenizer, config or metadata."""
    if path.suffix == ".gguf":
        from minicpm.formats.gguf.container import GGUFFile

        sizes, layer = {t.name: t.n_bytes for t in GGUFFile(path).tensors}, "blk."
    else:
        from minicpm.formats.hf import tensor_bytes, weight_files

        sizes, layer = tensor_bytes(weight_files(path)), "model.layers."
    return sum(sizes.values()), sum(v for k, v in sizes.items() if k.startswith(layer))


# --- perplexity ------------------------------------------------------------------------------------
def ours_ppl(model: Path | str, protocol: str, limit: int, seqlen: int, threads: int, work: Path) -> dict:
    out = work / f"ppl-{protocol}"
    cmd = [VENV / "bin" / "minicpm", "eval", "ppl", model, "--protocol", protocol, "--limit", limit,
           "--seqlen", seqlen, "--threads", threads, "--output", out]
    timed_command(cmd, work / f"ppl-{protocol}.log")
    numbers = json.loads((out / "results.json").read_text())["numbers"]
    return {"ppl": numbers["ppl"], "pm": numbers["uncertainty"], "scored": numbers["n_tokens_scored"],
            "command": shown(cmd)}


def llama_ppl(tools: Path, gguf: Path, chunks: int, threads: int, work: Path) -> dict:
    cmd = [tools / "llama-perplexity", "-m", gguf, "-f", WIKI / "wiki.test.raw", "-c", 512, "-b", 512,
           "--chunks", chunks, "-t", threads]
    log = work / "llama-perplexity.log"
    timed_command(cmd, log)
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log.read_text(errors="replace"))
    if not found:
        sys.exit(f"error: no final estimate in {log}")
    return {"ppl": float(found.group(1)), "pm": float(found.group(2)), "command": shown(cmd)}


# --- decode speed, in a child process of its own ----------------------------------------------------
def decode_ours(path: str) -> dict:
    from minicpm.bench.cases import prompt_ids
    from minicpm.bench.engines import load_ours, ours_greedy_tokens, timed_tokens

    model, _ = load_ours(Path(path), None)
    ids = prompt_ids(model.config.vocab_size, PROMPT)
    return median_decode([timed_tokens(ours_greedy_tokens(model, ids, NEW_TOKENS)) for _ in range(DECODE_RUNS)])


def decode_llama(path: str) -> dict:
    from minicpm.bench.cases import prompt_ids
    from minicpm.bench.engines import llama_greedy_tokens, open_llama, timed_tokens

    llm, _ = open_llama(Path(path), n_ctx=PROMPT + NEW_TOKENS + 16, n_batch=PROMPT)
    ids = prompt_ids(llm.n_vocab(), PROMPT)
    llm.eval(ids[:16])  # warm-up
    runs = []
    for _ in range(DECODE_RUNS):
        llm.reset()
        runs.append(timed_tokens(llama_greedy_tokens(llm, ids, NEW_TOKENS)))
    return median_decode(runs)


def median_decode(runs: list[dict]) -> dict:
    """The run of median decode speed."""
    return sorted(runs, key=lambda r: r["decode"])[len(runs) // 2]


def decode_speed(engine: str, path: Path, threads: int) -> float | str:
    r = run_child([sys.executable, __file__, "--child", engine, str(path)], threads, timeout=1800)
    return r if isinstance(r, str) else r["decode"]


# --- the models -------------------------------------------------------------------------------------
def parameters(gguf: Path) -> tuple[int, int]:
    """(the model's parameters, those of its decoder layers), counted from the float GGUF's tensor
    shapes (a tied head is stored once there)."""
    from minicpm.formats.gguf.container import GGUFFile

    counts = {t.name: t.n_elements for t in GGUFFile(gguf).tensors}
    return sum(counts.values()), sum(n for name, n in counts.items() if name.startswith("blk."))


def sources(name: str, work: Path, base: Path) -> tuple[str, Path]:
    """(what our commands read, the f32 GGUF llama.cpp reads) for a model name; the GGUF is written
    again when the source is newer than it."""
    from minicpm.loading import default_model_path

    gguf = work / "float-f32.gguf"
    if name == "smollm2":
        source, stamp = "default", default_model_path().stat().st_mtime
    else:
        if not (base / "config.json").is_file():
            sys.exit(f"error: {base} has no config.json; pass --base with a checkpoint folder, or make the "
                     "default base model with `.venv/bin/python runs/quant_base.py` (~52 min)")
        source, stamp = str(base), max(p.stat().st_mtime for p in base.iterdir())
    if not gguf.is_file() or gguf.stat().st_mtime < stamp:
        timed_command([VENV / "bin" / "minicpm", "convert", source, gguf, "--to", "gguf", "--type", "f32",
                       "--dtype", "float32", "--force"], work / "convert.log")
    return source, gguf


def ours_name(method: str, bits: int, group: int | None, flags: tuple) -> str:
    return " ".join([method.upper(), f"int{bits}", f"g{group}" if group else "per row",
                     *(f.removeprefix("--") for f in flags)])


def run_ours(source: str, method: str, bits: int, group: int | None, flags: tuple, args, work: Path,
             seqlen: int) -> dict:
    name = ours_name(method, bits, group, flags)
    out = work / ("ours-" + "-".join(name.lower().split()))
    row = {"tool": "ours", "name": name}
    cmd = [VENV / "bin" / "minicpm", "quantize", source, out, "--method", method, "--bits", bits, *flags, "--force"]
    if group:
        cmd += ["--group-size", group]
    if method != "rtn":
        cmd += ["--calib", "wikitext2", "--samples", args.samples, "--seqlen", args.seqlen]
    row["quantize"] = timed_command(cmd, work / f"quantize-{out.name.removeprefix('ours-')}.log")
    return {**row, **measure(out, "ours", None, args, work / out.name, seqlen)}


def run_llama(tools: Path, gguf: Path, kind: str, imatrix: bool, args, work: Path, seqlen: int) -> dict:
    name = kind + (" + imatrix" if imatrix else "")
    out = work / f"llama-{kind}{'-imatrix' if imatrix else ''}.gguf"
    cmd = [tools / "llama-quantize"]
    if imatrix:
        cmd += ["--imatrix", work / "imatrix.gguf"]
    cmd += [gguf, out, kind, args.threads]
    row = {"tool": "llama.cpp", "name": name, "quantize": timed_command(cmd, work / f"quantize-{out.stem}.log")}
    return {**row, **measure(out, "llama", tools, args, work / out.stem, seqlen)}


def measure(model: Path, engine: str, tools: Path | None, args, work: Path, seqlen: int) -> dict:
    """Perplexity by both protocols (and llama-perplexity's for a llama.cpp file), size, decode speed."""
    work.mkdir(parents=True, exist_ok=True)
    total, layers = weight_bytes(model)
    r = {"size": size_on_disk(model), "weight_bytes": total, "layer_bytes": layers,
         "minicpm": ours_ppl(model, "minicpm", args.windows, seqlen, args.threads, work),
         "llama.cpp": ours_ppl(model, "llama.cpp", args.chunks, 512, args.threads, work),
         "decode": decode_speed("llama" if engine == "llama" else "ours", model, args.threads)}
    if tools is not None:
        r["llama-perplexity"] = llama_ppl(tools, model, args.chunks, args.threads, work)
    return r


def report_model(name: str, args, tools: Path, earlier: dict | None = None) -> dict:
    """Every row of one model's table; rows of `earlier` (a saved result) with the same name are
    taken as they are."""
    work = args.keep / name
    work.mkdir(parents=True, exist_ok=True)
    source, gguf = sources(name, work, args.base)
    seqlen = 2048 if name == "smollm2" else 512  # the base model was trained on 512-token windows
    kept = {(r["tool"], r["name"]): r for r in (earlier or {}).get("rows", [])}

    def row(tool: str, label: str, make, *make_args) -> dict:
        return kept.get((tool, label)) or make(*make_args)

    def float_row() -> dict:
        r = {"tool": "float", "name": label,
             **measure(gguf if name == "smollm2" else Path(source), "ours", None, args, work / "float", seqlen)}
        return {**r, "llama-perplexity": llama_ppl(tools, gguf, args.chunks, args.threads, work / "float")}

    label = "float32 GGUF (the Q4_1 dequantized)" if name == "smollm2" else "bf16"
    rows = [row("float", label, float_row)]
    for method, bits, group, flags in OURS:
        rows.append(row("ours", ours_name(method, bits, group, flags),
                        run_ours, source, method, bits, group, flags, args, work, seqlen))
    imatrix = {}

    def llama_row(kind: str, use_imatrix: bool) -> dict:
        if use_imatrix and not imatrix:
            imatrix.update(timed_command(
                [tools / "llama-imatrix", "-m", gguf, "-f", WIKI / "wiki.valid.raw", "-o", work / "imatrix.gguf",
                 "-c", args.seqlen, "-b", args.seqlen, "--chunks", args.samples, "-t", args.threads],
                work / "imatrix.log"))
        r = run_llama(tools, gguf, kind, use_imatrix, args, work, seqlen)
        return {**r, "imatrix": dict(imatrix)} if use_imatrix else r

    for kind, use_imatrix in LLAMA:
        rows.append(row("llama.cpp", kind + (" + imatrix" if use_imatrix else ""),
                        llama_row, kind, use_imatrix))
    total, layers = parameters(gguf)
    return {"model": name, "source": source, "parameters": total, "layer_parameters": layers, "seqlen": seqlen,
            "rows": rows}


# --- the Markdown -----------------------------------------------------------------------------------
def rtn_row(rows: list[dict], grid: list[str]) -> dict:
    """Our RTN row at a grid (["int4", "g128"], ["int8", "per"])."""
    return next(r for r in rows if r["tool"] == "ours" and r["name"].split()[:3] == ["RTN", *grid])


def shift(rows: list[dict], row: dict, key: str) -> float:
    """A row's perplexity over float's, minus 1."""
    return row[key]["ppl"] / rows[0][key]["ppl"] - 1


def recovered(rows: list[dict], row: dict, key: str) -> str:
    """The share of RTN's perplexity increase over float that a calibrated method at the same bits
    and group size recovers: (RTN - method) / (RTN - float); "n/a" where RTN moves perplexity by
    less than MIN_SHIFT (shares of smaller differences are noise)."""
    if row["tool"] != "ours" or row["name"].startswith("RTN"):
        return ""
    rtn = rtn_row(rows, row["name"].split()[1:3])
    if shift(rows, rtn, key) < MIN_SHIFT:
        return "n/a"
    worst = rtn[key]["ppl"]
    return f"{(worst - row[key]['ppl']) / (worst - rows[0][key]['ppl']):.0%}"


def fmt_ppl(p: dict | None) -> str:
    return "" if p is None else f"{p['ppl']:.3f} ± {p['pm']:.3f}"


def table(result: dict) -> list[str]:
    rows, n, n_layers = result["rows"], result["parameters"], result["layer_parameters"]
    lines = ["| quantization | bits/weight | layers' bits/weight | size on disk MB "
             "| perplexity, minicpm protocol | recovered | perplexity, llama.cpp protocol | recovered "
             "| llama-perplexity | quantize s "
             "| quantize peak RSS MiB | decode tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        q = r.get("quantize")
        cells = [f"{r['tool']}: {r['name']}", f"{8 * r['weight_bytes'] / n:.2f}",
                 f"{8 * r['layer_bytes'] / n_layers:.2f}", f"{r['size'] / 1e6:.1f}",
                 fmt_ppl(r["minicpm"]), recovered(rows, r, "minicpm"), fmt_ppl(r["llama.cpp"]),
                 recovered(rows, r, "llama.cpp"), fmt_ppl(r.get("llama-perplexity")),
                 f"{q['seconds']:.0f}" if q else "", f"{q['rss']:.0f}" if q else "",
                 r["decode"] if isinstance(r["decode"], str) else f"{r['decode']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(result: dict) -> list[str]:
    """The issue's two quality targets, read off the table: GPTQ and AWQ int4 recover at least half of
    RTN int4's increase; our best int4 is at least as good as Q4_K_M with an imatrix at no more bits."""
    rows, n_layers = result["rows"], result["layer_parameters"]
    named = {f"{r['tool']}: {r['name']}": r for r in rows}
    lines = []
    for row in rows:
        if row["tool"] == "ours" and " int4 " in row["name"] and not row["name"].startswith("RTN"):
            shares = [recovered(rows, row, key) for key in ("minicpm", "llama.cpp")]
            lines.append(f"- {row['name']} recovers {shares[0]} (minicpm protocol) and {shares[1]} "
                         "(llama.cpp protocol) of RTN's increase: target 50%.")
    peer = named.get("llama.cpp: Q4_K_M + imatrix")
    ours = [r for r in rows if r["tool"] == "ours" and " int4 " in r["name"]
            and r["layer_bytes"] <= peer["layer_bytes"]] if peer else []
    if ours:
        best = min(ours, key=lambda r: r["llama.cpp"]["ppl"])
        shifts = [shift(rows, rtn_row(rows, ["int4", "g128"]), key) for key in ("minicpm", "llama.cpp")]
        if min(shifts) < MIN_SHIFT:
            verdict = (f"not decided: RTN int4 g128 moves this model's perplexity by {shifts[0]:+.2%} / "
                       f"{shifts[1]:+.2%}, less than {MIN_SHIFT:.0%}, so the int4 rows differ by noise")
        else:
            met = all(best[key]["ppl"] <= peer[key]["ppl"] for key in ("minicpm", "llama.cpp"))
            verdict = "met" if met else "not met"

        def bits(r: dict) -> str:
            return f"{8 * r['layer_bytes'] / n_layers:.2f}"
        lines.append(f"- Our best int4 at no more bits per layer weight than Q4_K_M + imatrix ({best['name']}, "
                     f"{bits(best)} bits/weight): {best['minicpm']['ppl']:.3f} / {best['llama.cpp']['ppl']:.3f} "
                     f"(minicpm / llama.cpp protocol) against Q4_K_M + imatrix ({bits(peer)} bits/weight): "
                     f"{peer['minicpm']['ppl']:.3f} / {peer['llama.cpp']['ppl']:.3f}: target {verdict}.")
    return lines


def commands(result: dict) -> list[str]:
    out = []
    for r in result["rows"]:
        for key in ("quantize", "minicpm", "llama.cpp", "llama-perplexity", "imatrix"):
            if key in r:
                out.append(r[key]["command"])
    return ["<details><summary>commands</summary>", "", "```sh", *dict.fromkeys(out), "```", "", "</details>"]


def settings_line(result: dict) -> str:
    a = result["settings"]
    return (f"Measured {a['measured']} in {a['minutes']:.0f} min by `.venv/bin/python benchmarks/quantization.py "
            f"--models {result['model']} --samples {a['samples']} --seqlen {a['seqlen']} --windows {a['windows']} "
            f"--chunks {a['chunks']} --threads {a['threads']}`: calibration {a['samples']} x {a['seqlen']} tokens; "
            f"minicpm protocol over the first {a['windows']} windows of {result['seqlen']} tokens, llama.cpp "
            f"protocol over the first {a['chunks']} chunks of 512.")


def markdown(results: list[dict]) -> str:
    lines = ["## Report", "",
             f"Machine: {machine()}; one command at a time. Bits per weight: the "
             "tensors' bytes x 8 / the model's parameters (a tied embedding counted once), so the head and "
             "embedding count (ours: an int8 head whose rows the embedding reads; llama.cpp's k-quant mixes: "
             "q6_K); layers' bits/weight: the same for the decoder layers alone, where the methods differ. "
             "Perplexity: WikiText-2 test; the minicpm protocol (windows of 2048 tokens for SmolLM2, 512 for "
             "the base model, which was trained on 512) and the llama.cpp protocol (chunks of 512, the second "
             "half of each scored) by `minicpm eval ppl`, and llama.cpp's files also by `llama-perplexity` on the "
             "same chunks. \"Recovered\": (RTN - method) / (RTN - float) at the same bits and group size; n/a where RTN "
             f"moves perplexity by less than {MIN_SHIFT:.0%}. Decode: greedy, batch "
             f"1, {PROMPT}-token prompt, {NEW_TOKENS} new tokens, median of {DECODE_RUNS} runs. Calibration: WikiText-2 validation, the same "
             "number of tokens for GPTQ, AWQ and llama-imatrix.", ""]
    for result in results:
        lines += [f"### {result['model']}: {result['parameters'] / 1e6:.1f} M parameters", "", settings_line(result),
                  "", *table(result), "", *verdicts(result), "", *commands(result), ""]
    return "\n".join(lines)


def model_sections(report: str) -> dict[str, str]:
    """A report's per-model sections ("### name: ..." up to the next one), by model name."""
    return {part[4:].split(":")[0]: part for part in re.split(r"(?m)^(?=### )", report)[1:]}


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace the report between the markers of `path` (append it, with markers, the first time);
    the sections of models this run did not measure are kept as they were."""
    doc = path.read_text(encoding="utf-8")
    start, end = MARKERS
    if start in doc and end in doc:
        old, new = model_sections(doc[doc.index(start) + len(start):doc.index(end)]), model_sections(text)
        kept = [section.strip("\n") for name, section in old.items() if name not in new]
        text = "\n\n".join([text.rstrip("\n"), *kept])
        doc = doc[:doc.index(start) + len(start)] + "\n" + text + "\n" + doc[doc.index(end):]
    else:
        doc = doc.rstrip("\n") + f"\n\n{start}\n{text}\n{end}\n"
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        runner = decode_ours if sys.argv[2] == "ours" else decode_llama
        print(json.dumps(measure_here(runner, int(os.environ["BENCH_THREADS"]), sys.argv[3])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,base", help="comma-separated: smollm2, base")
    p.add_argument("--samples", type=count(1, "--samples"), default=32, help="calibration windows")
    p.add_argument("--seqlen", type=count(16, "--seqlen"), default=512, help="calibration window tokens")
    p.add_argument("--windows", type=count(1, "--windows"), default=16, help="minicpm-protocol windows scored")
    p.add_argument("--chunks", type=count(1, "--chunks"), default=64, help="llama.cpp-protocol chunks scored")
    p.add_argument("--threads", type=count(1, "--threads"), default=2)
    p.add_argument("--base", type=Path, default=BASE, help="the base model's folder (runs/quant_base.py's output)")
    p.add_argument("--keep", type=folder, default=Path.home() / ".cache/minicpm/bench/quantization",
                   help="working folder (quantized files, logs)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the rows saved by an earlier run (in --keep); measure only those missing")
    p.add_argument("--write-doc", action="store_true", help=f"put the tables into {DOC.relative_to(ROOT)}")
    args = p.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ("smollm2", "base")]
    if unknown or not models:
        p.error(f"--models takes smollm2 and/or base, not {args.models!r}")
    if not Path("/usr/bin/time").is_file():
        sys.exit("error: /usr/bin/time is missing (install GNU time): peak RSS is read from it")
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit("error: llama-cpp-python is not installed here; it decodes llama.cpp's files for their tok/s: "
                 "build it once with `bash scripts/build_llama_cpp.sh .venv` (9-15 min on 2 cores)")
    tools = llama_tools(VENV, *TOOLS)
    results = []
    for name in models:
        saved = args.keep / f"{name}.json"
        earlier = json.loads(saved.read_text()) if args.reuse and saved.is_file() else None
        started = time.time()
        result = report_model(name, args, tools, earlier)
        if earlier and len(earlier["rows"]) == len(result["rows"]):
            results.append(earlier)
            continue
        before = (earlier or {}).get("settings", {}).get("minutes", 0.0)  # the kept rows' time
        result["settings"] = {"samples": args.samples, "seqlen": args.seqlen, "windows": args.windows,
                              "chunks": args.chunks, "threads": args.threads,
                              "minutes": before + (time.time() - started) / 60,
                              "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        saved.write_text(json.dumps(result, indent=1))
        results.append(result)
    text = markdown(results)
    print(text)
    if args.write_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
