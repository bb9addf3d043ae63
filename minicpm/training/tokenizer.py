"""Train a tokenizer for a from-scratch model: BPE with byte fallback, in the Hugging Face layout.

    minicpm train tokenizer corpus.txt --vocab-size 8000 --out my-tokenizer

The shape is MiniCPM's (a SentencePiece-style BPE): words carry a leading "▁" for their space,
the 256 byte tokens <0x00>..<0xFF> (ids 3..258) spell any character the merges never saw, so
nothing maps to <unk>, and <unk>, <s>, </s> are ids 0, 1, 2. The chat markers of the MiniCPM
template (<用户>, <AI>) are special tokens, and the template is stored, so a model trained from
this tokenizer chats like MiniCPM. Training is `tokenizers`' BpeTrainer (Rust, multi-threaded).

Output: tokenizer.json, tokenizer_config.json, special_tokens_map.json, loadable here and by
transformers' AutoTokenizer. The directory appears only when complete.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from minicpm.errors import MiniCPMError
from minicpm.training.corpus import documents

SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_MARKERS = ["<用户>", "<AI>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
MIN_MERGES = 16


def train_tokenizer(files: list[str | Path], out_dir: str | Path, vocab_size: int = 32000,
                    text_field: str = "text", overwrite: bool = False, model_max_length: int = 4096) -> Path:
    """Train on `files` (plain text, or .jsonl with `text_field`) and write the tokenizer to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minicpm.files import atomic_dir
    from minicpm.formats.hf import check_writable

    reserved = len(SPECIAL) + len(BYTES) + len(CHAT_MARKERS)
    if vocab_size < reserved + MIN_MERGES:
        raise MiniCPMError(f"vocab_size must be at least {reserved + MIN_MERGES} ({reserved} reserved for "
                           f"special and byte tokens, plus merges), got {vocab_size}")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise MiniCPMError(f"{path}: no such file")
    out = Path(out_dir)
    check_writable(out, overwrite)

    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTES) - len(CHAT_MARKERS), special_tokens=SPECIAL,
                                  show_progress=sys.stderr.isatty())
    texts = list(_texts(paths, text_field))
    if not any(t.strip() for t in texts):
        raise MiniCPMError(f"{', '.join(map(str, paths))}: no text to train on")
    learner.train_from_iterator(texts, trainer=trainer, length=len(texts))

    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL + BYTES)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.pre_tokenizer = pre
    # as Llama's tokenizer.json decodes: "▁" back to spaces, bytes to characters, the first space dropped
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(SPECIAL + CHAT_MARKERS)
    from tokenizers import processors

    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    with atomic_dir(out) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_configs(tmp, model_max_length)
    return out


def _texts(paths: list[Path], text_field: str) -> Iterator[str]:
    for path in paths:
        for _, text, _ in documents(path, text_field):
            if isinstance(text, str) and text:
                yield text


def _write_configs(directory: Path, model_max_length: int) -> None:
    from minicpm.tokenizer.templates import MINICPM_TEMPLATE

    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {**names, "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
              "model_max_length": model_max_length, "additional_special_tokens": CHAT_MARKERS,
              "clean_up_tokenization_spaces": False, "legacy": False, "chat_template": MINICPM_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                     encoding="utf-8")
    special = {**names, "additional_special_tokens": CHAT_MARKERS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False),
                                                       encoding="utf-8")
