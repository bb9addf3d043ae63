"""Perplexity of a text under two protocols, so that a number sits beside the one it is compared
with:

  minicpm    the official `quantize/quantize_eval.py` (and GPTQ's `llama_eval`): the text tokenized
             once (the tokenizer's own BOS policy, so at most one BOS, at the start), cut into
             non-overlapping `seqlen`-token windows (default 2048, the tail dropped), no BOS per
             window; each window's loss is the mean NLL of its seqlen-1 next-token predictions and
             ppl = exp(mean of the window losses).
  llama.cpp  `llama-perplexity`: the text tokenized once with special tokens, cut into
             non-overlapping `n_ctx`-token chunks (default 512); the first token of every chunk is
             replaced by BOS when the vocabulary adds one, only the predictions at positions
             >= n_ctx/2 are scored (255 per 512-token chunk), ppl = exp(mean NLL) and the ± is
             llama.cpp's: ppl * sqrt(var(NLL) / (count - 1)).

Each window is one full forward pass (no KV cache), `batch_size` windows at a time. The logits are
fp32 (as both references compute them) and are made a slice of positions at a time from the
final hidden states, so a 2048-token window over a 122k vocabulary never holds its whole logits
matrix (1 GB) at once.

The built-in data are WikiText-2's raw test and validation splits (evaluation/data). Under the
minicpm protocol they are given to the tokenizer as the official script gives them: the Hugging
Face rows (one per line of the raw file, a blank line being the empty row) joined with "\\n\\n";
under the llama.cpp protocol as the raw file, which is what `llama-perplexity -f wiki.test.raw`
reads. A user's text file is read as is under both protocols.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError

PROTOCOLS = {"minicpm": 2048, "llama.cpp": 512}  # protocol -> default window length
DATA_DIR = Path(__file__).parent / "data"
BUILTIN_DATA = {"wikitext2": "wiki.test.raw", "wikitext2-valid": "wiki.valid.raw"}
LOGIT_BUDGET = 1 << 24  # fp32 logits held at once: 64 MB (341 positions of a 49k vocab, 136 of 122k)


@dataclass
class PerplexityResult:
    """One perplexity measurement. `tokens_per_second` counts every token run through the model
    (n_windows x seqlen), as a throughput; `window_nlls` are each window's mean NLL over its
    scored positions."""

    ppl: float
    uncertainty: float          # llama.cpp's ± (one standard error, in perplexity units)
    protocol: str
    seqlen: int
    n_windows: int
    n_tokens_scored: int
    n_tokens_total: int         # tokens in the whole text
    seconds: float              # the forward passes and losses (tokenizing not included)
    tokens_per_second: float
    window_nlls: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything but the per-window list (what results.json's numbers hold)."""
        out = asdict(self)
        del out["window_nlls"]
        return out


@dataclass(frozen=True)
class TextData:
    """A text to measure and where it came from."""

    text: str
    name: str                  # "wikitext2", "wikitext2-valid" or the path given
    path: Path
    form: str                  # how the file became `text`


# --- data ----------------------------------------------------------------------------------------
def read_data(spec: str, protocol: str = "minicpm") -> TextData:
    """`wikitext2` (test split), `wikitext2-valid`, or the path of a UTF-8 text file; the text in
    the form the protocol's reference reads (see the module docstring)."""
    check_protocol(protocol)
    if spec in BUILTIN_DATA:
        path = DATA_DIR / BUILTIN_DATA[spec]
        raw = read_text_file(path)
        if protocol == "minicpm":
            return TextData(hf_rows_joined(raw), spec, path, 'Hugging Face rows joined with "\\n\\n"')
        return TextData(raw, spec, path, "raw file")
    return TextData(read_text_file(Path(spec)), spec, Path(spec), "file as is")


def read_text_file(path: Path) -> str:
    if not path.exists():
        raise MiniCPMError(f"data file {path} does not exist (give a UTF-8 text file, "
                           f"or one of: {', '.join(BUILTIN_DATA)})")
    if not path.is_file():
        raise MiniCPMError(f"data file {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MiniCPMError(f"data file {path} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MiniCPMError(f"data file {path} is not UTF-8 text (byte {e.start}: "
                           f"{data[e.start:e.start + 1]!r})") from None
    if not text.strip():
        raise MiniCPMError(f"data file {path} is empty")
    return text


def hf_rows_joined(raw: str) -> str:
    """The text quantize_eval.py tokenizes: `"\\n\\n".join(dataset["text"])`, where the Hugging
    Face wikitext builder made one row per line of the raw file and a whitespace-only line the
    empty row."""
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


# --- checks --------------------------------------------------------------------------------------
def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise MiniCPMError(f"unknown perplexity protocol {protocol!r}; choose minicpm or llama.cpp")


def window_length(model, protocol: str, seqlen: int | None) -> int:
    """The window (llama.cpp: n_ctx) length, checked against the model's context."""
    check_protocol(protocol)
    seqlen = PROTOCOLS[protocol] if seqlen is None else seqlen
    if seqlen < 2:
        raise MiniCPMError(f"--seqlen must be >= 2 (a window needs a token to predict), got {seqlen}")
    context = model.config.max_position_embeddings
    if seqlen > context:
        raise MiniCPMError(f"--seqlen {seqlen} is longer than the model's context "
                           f"({context} tokens); give --seqlen {context} or less")
    return seqlen


def first_scored(protocol: str, seqlen: int) -> int:
    """The first window position whose prediction counts: llama.cpp scores the second half only
    (the first half is context)."""
    return seqlen // 2 if protocol == "llama.cpp" else 0


def bos_per_window(protocol: str, tokenizer) -> bool:
    """llama.cpp puts BOS over the first token of every chunk when the vocabulary adds BOS."""
    return protocol == "llama.cpp" and bool(tokenizer.add_bos_token) and tokenizer.bos_token_id is not None


def tokens_needed(protocol: str, seqlen: int) -> int:
    # llama-perplexity refuses fewer than 2 * n_ctx tokens; the official script needs one window
    return 2 * seqlen if protocol == "llama.cpp" else seqlen


# --- scoring -------------------------------------------------------------------------------------
def encode_text(tokenizer, text: str) -> list[int]:
    """The text tokenized once, with the tokenizer's special-token policy (both references)."""
    if not text.strip():
        raise MiniCPMError("the text to measure is empty")
    return tokenizer.encode(text, add_special_tokens=True)


def perplexity(model, tokenizer, text: str | Sequence[int], protocol: str = "minicpm",
               seqlen: int | None = None, batch_size: int = 1, limit: int | None = None,
               progress: bool = True, kv_cache: str | None = None,
               prefill_chunk: int = 512) -> PerplexityResult:
    """Perplexity of `text` (a string, or its ids from `encode_text`) under `protocol`; `limit`
    keeps the first N windows.

    With `kv_cache` ("auto", "int8", "int4") each window runs as a generation prefill does:
    `prefill_chunk` tokens at a time through a KV cache of that kind, every chunk attending to
    the keys and values as the cache stored them. This measures what a quantized cache costs;
    without it a window is one pass with nothing stored."""
    seqlen = window_length(model, protocol, seqlen)
    if batch_size < 1:
        raise MiniCPMError(f"--batch-size must be >= 1, got {batch_size}")
    if prefill_chunk < 1:
        raise MiniCPMError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    if limit is not None and limit < 1:
        raise MiniCPMError(f"--limit must be >= 1, got {limit}")
    ids = encode_text(tokenizer, text) if isinstance(text, str) else list(text)
    needed = tokens_needed(protocol, seqlen)
    if len(ids) < needed:
        raise MiniCPMError(f"the text is {len(ids)} tokens long; the {protocol} protocol with "
                           f"--seqlen {seqlen} needs at least {needed} tokens")
    windows = cut_windows(ids, seqlen, limit)
    if bos_per_window(protocol, tokenizer):
        windows[:, 0] = tokenizer.bos_token_id
    start = time.perf_counter()
    sums = score_windows(model, windows, first_scored(protocol, seqlen), batch_size, progress,
                         f"ppl ({protocol})", kv_cache, prefill_chunk)
    seconds = time.perf_counter() - start
    return summarize(sums, protocol, seqlen, len(ids), seconds)


def cut_windows(ids: Sequence[int], seqlen: int, limit: int | None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows from the start, the tail dropped."""
    n = len(ids) // seqlen
    if limit is not None:
        n = min(n, limit)
    return torch.tensor(list(ids[:n * seqlen]), dtype=torch.long).view(n, seqlen)


@dataclass
class NllSums:
    """Per window: NLL sum, NLL squared sum (float64) and the count of scored positions."""

    sums: list[float] = field(default_factory=list)
    squares: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def mean(self) -> float:
        return sum(self.sums) / sum(self.counts)


def score_windows(model, windows: torch.Tensor, first: int, batch_size: int, progress: bool,
                  label: str, kv_cache: str | None = None, prefill_chunk: int = 512) -> NllSums:
    """The NLL of each window's tokens first+1 .. end given what precedes them in the window."""
    from tqdm import tqdm

    out = NllSums()
    bar = tqdm(total=len(windows), desc=label, unit="window", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(model.device)
            nll = window_nlls(model, batch, first, kv_cache, prefill_chunk).double()
            out.sums += nll.sum(-1).tolist()
            out.squares += (nll * nll).sum(-1).tolist()
            out.counts += [nll.shape[-1]] * len(batch)
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(out.mean()):.4f}")
    return out


def window_hidden(model, batch: torch.Tensor, kv_cache: str | None, prefill_chunk: int) -> torch.Tensor:
    """Final hidden states of every position: one pass, or chunks through a KV cache."""
    if kv_cache is None:
        return model(batch, hidden=True)
    cache = model.new_cache(len(batch), batch.shape[1], kv_dtype=kv_cache)
    return torch.cat([model(batch[:, i:i + prefill_chunk], cache=cache, hidden=True)
                      for i in range(0, batch.shape[1], prefill_chunk)], dim=1)


def window_nlls(model, batch: torch.Tensor, first: int, kv_cache: str | None = None,
                prefill_chunk: int = 512) -> torch.Tensor:
    """[B, S - 1 - first] fp32 NLLs of batch[:, first+1:], the logits made LOGIT_BUDGET floats
    at a time."""
    hidden = window_hidden(model, batch, kv_cache, prefill_chunk)[:, first:-1]
    targets = batch[:, first + 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    step = max(1, LOGIT_BUDGET // model.config.vocab_size)
    parts = []
    for i in range(0, len(flat), step):
        logits = model.project(flat[i:i + step])
        gold = logits.gather(-1, targets[i:i + step, None])[:, 0]
        parts.append(torch.logsumexp(logits, dim=-1) - gold)
    return torch.cat(parts).view(len(batch), -1)


def summarize(sums: NllSums, protocol: str, seqlen: int, total: int, seconds: float) -> PerplexityResult:
    count = sum(sums.counts)
    mean = sums.mean()
    ppl = math.exp(mean)
    variance = sum(sums.squares) / count - mean * mean
    # llama-perplexity's "± " : the standard error of the mean NLL, carried to the perplexity
    uncertainty = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    n = len(sums.counts)
    return PerplexityResult(
        ppl=ppl, uncertainty=uncertainty, protocol=protocol, seqlen=seqlen, n_windows=n,
        n_tokens_scored=count, n_tokens_total=total, seconds=seconds,
        tokens_per_second=n * seqlen / seconds if seconds > 0 else float("inf"),
        window_nlls=[s / c for s, c in zip(sums.sums, sums.counts)])
