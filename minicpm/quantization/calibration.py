"""Calibration samples for GPTQ/AWQ: token windows cut from a text.

`--calib` names the text: a UTF-8 file, `wikitext2` (the *validation* split shipped for
`minicpm eval ppl`, evaluation/data/wiki.valid.raw: no train split is shipped, and the test split
is what perplexity is measured on), or `alpaca` (the MiniCPM repository's calibration records,
quantization/data/, CC BY-NC 4.0). The text is tokenized once and `samples` windows of `seqlen`
tokens are taken at seeded random offsets, as the GPTQ reference's WikiText-2 loader does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minicpm.errors import MiniCPMError
from minicpm.evaluation.ppl import encode_text, read_data, read_text_file

ALPACA = Path(__file__).with_name("data") / "alpaca_calibration.json"
BUILTIN = ("wikitext2", "alpaca")
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


def calibration_text(spec: str) -> str:
    """The text `--calib spec` names."""
    if spec == "wikitext2":
        return read_data("wikitext2-valid").text
    if spec == "alpaca":
        records = json.loads(ALPACA.read_text(encoding="utf-8"))
        return "\n\n".join("\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k))
                           for r in records)
    path = Path(spec)
    if not path.exists():
        raise MiniCPMError(f"calibration file {spec} does not exist (give a UTF-8 text file, "
                           f"or one of: {', '.join(BUILTIN)})")
    return read_text_file(path)


def calibration_ids(tokenizer, spec: str, samples: int = DEFAULT_SAMPLES, seqlen: int = DEFAULT_SEQLEN,
                    seed: int = 0) -> torch.Tensor:
    """[samples, seqlen] token ids from the text `spec` names."""
    if samples < 1:
        raise MiniCPMError(f"--samples must be >= 1, got {samples}")
    if seqlen < 2:
        raise MiniCPMError(f"--seqlen must be >= 2, got {seqlen}")
    if tokenizer is None:
        raise MiniCPMError("calibration needs the checkpoint's tokenizer, and the source has none")
    ids = torch.tensor(encode_text(tokenizer, calibration_text(spec)), dtype=torch.long)
    if len(ids) < seqlen:
        raise MiniCPMError(f"calibration text {spec} is {len(ids)} tokens, shorter than one sample "
                           f"(--seqlen {seqlen})")
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
