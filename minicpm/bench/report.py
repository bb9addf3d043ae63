"""The benchmark's Markdown: a table per shape with ratios to llama.cpp at the matching precision,
the 2k-context memory table, and the header that says how it was measured."""

from __future__ import annotations

from datetime import datetime, timezone

from minicpm.bench.cases import CTX, CTX_NEW, CTX_PROMPT, NEW_TOKENS, PEER, PEER_ENGINES, PROMPT_TOKENS
from minicpm.bench.machine import machine


def markdown_table(columns: list[str], text_columns: int, rows: list[tuple[str, str, dict | str]],
                   cells) -> list[str]:
    """A Markdown table of (engine, precision, result) rows: `cells(result)` gives the cells after
    the first two of a measured row; a result that is a string says why the row was not run."""
    align = ["---" if i < text_columns else "---:" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    for engine, precision, r in rows:
        if isinstance(r, str):
            lines.append(f"| {engine} | {precision} | not run: {r} |" + " |" * (len(columns) - 3))
        else:
            lines.append("| " + " | ".join([engine, precision, *cells(precision, r)]) + " |")
    return lines


def ratios(rows: list[tuple[str, str, dict | str]], peer_of: dict[str, str]):
    """cells -> (prefill, decode) ratio strings against the peer's row at the matching precision:
    llama-bench's where it ran, else llama-cpp-python's (PEER_ENGINES order)."""
    peer = {p: r for engine in PEER_ENGINES for e, p, r in rows if e == engine and isinstance(r, dict)}

    def of(precision: str, r: dict) -> list[str]:
        p = peer.get(peer_of.get(precision, precision))
        return [f"{r[k] / p[k]:.2f}x" if p else "n/a" for k in ("prefill", "decode")]
    return of


def table(shape: str, rows: list[tuple[str, str, dict | str]], bandwidth: float) -> str:
    """Markdown rows for one shape; ratios are to llama.cpp at the matching precision (`ratios`)."""
    ratio = ratios(rows, PEER)

    def cells(precision: str, r: dict) -> list[str]:
        limit = bandwidth * 1e9 / r["weight_bytes"]
        return ["-" if r["load"] is None else f"{r['load']:.1f}", f"{r['ttft']:.2f}", f"{r['prefill']:.1f}", f"{r['decode']:.2f}",
                f"{r['weight_bytes'] / 1e9:.2f}", f"{r['decode'] / limit:.0%} of {limit:.1f}",
                f"{r['rss']:.0f}", *ratio(precision, r)]

    columns = ["engine", "precision", "load s", "TTFT s", "prefill tok/s", "decode tok/s",
               "weights GB/token", "decode / bandwidth limit", "peak RSS MB",
               "prefill vs llama.cpp", "decode vs llama.cpp"]
    return "\n".join([f"### {shape}", "", *markdown_table(columns, 2, rows, cells)]) + "\n"


def memory_table(shape: str, rows: list[tuple[str, str, dict | str]]) -> str:
    """The 2k-context chat case: peak RSS first, speeds for context."""
    def cells(precision: str, r: dict) -> list[str]:
        return [r["kv"], f"{r['load']:.1f}", f"{r['prefill']:.1f}", f"{r['decode']:.2f}",
                f"{r['rss']:.0f}"]

    columns = ["engine", "precision", "KV cache", "load s", "prefill tok/s", "decode tok/s",
               "peak RSS MB"]
    title = (f"#### {shape}: chat with a {CTX}-token context ({CTX_PROMPT}-token prompt + "
             f"{CTX_NEW} new tokens)")
    return "\n".join([title, "", *markdown_table(columns, 3, rows, cells)]) + "\n"


def header(threads: int, bandwidth: float) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"## MiniCPM shapes, random weights ({stamp})", "",
        f"Machine: {machine()}; threads: {threads}; memory read bandwidth {bandwidth:.1f} GB/s "
        "(best sum over a 1 GiB fp32 tensor).",
        "Seeded random weights of the real shapes (config presets), bf16 checkpoint; GGUFs "
        "written from the same weights by `write_gguf` (q4_0 puts the tied head in q6_k, q8_0 "
        "where its rows are not whole 256-value blocks, as llama.cpp's quantizer does); ours "
        "\"q4_0 GGUF\" runs that very file as stored. "
        f"Prefill: one {PROMPT_TOKENS}-token prompt, TTFT = prompt in to first token out. Decode: {NEW_TOKENS} new tokens, batch 1, greedy. Each engine in its own "
        "process; ours int8/int4 load checkpoints written beforehand by `quantize_checkpoint` "
        "(head int8 unless named, int4 group 128; a tied embedding reads the head's rows). "
        "The bandwidth limit is bandwidth / weight bytes read per token (KV cache left out). Ratios are to "
        "llama.cpp at the matching precision (bf16 vs f16, int8 vs q8_0, int4 vs q4_0): to llama.cpp's own "
        f"`llama-bench` on the same file where it ran (pp{PROMPT_TOKENS}; tg{NEW_TOKENS} at depth {PROMPT_TOKENS}; "
        "built by scripts/build_llama_tools.sh; no load time), else to llama-cpp-python's row.", "",
    ])
