"""GET /tokenizer_info: what a client needs to use the server's tokenizer instead of its own.

lm-evaluation-harness's `local-completions` model, with its default `tokenizer_backend=auto`, uses
the server's tokenizer (and downloads none) when GET /tokenizer_info answers with an `eos_token`
and POST /tokenize with `tokens` (app.py; vLLM's shapes, which lm-eval was written against:
/tokenize {"prompt", "add_special_tokens"} -> {"tokens", ...}, /detokenize {"tokens"} ->
{"prompt"}). The body here: the special tokens as text (`eos_token`, `bos_token`, `pad_token`,
`unk_token`, `additional_special_tokens`), the `chat_template` /v1/chat/completions applies,
`add_bos_token`/`add_eos_token`, `model_max_length` (the served context) and `vocab_size`.
lm-eval derives the EOS and prefix (BOS) ids by tokenizing those texts, so each is one token.
"""

from __future__ import annotations

from typing import Any


def tokenizer_info_body(tokenizer, context: int) -> dict[str, Any]:
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "additional_special_tokens": list(tokenizer.additional_special_tokens),
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": tokenizer.add_eos_token,
        "chat_template": tokenizer.active_chat_template,
        "model_max_length": context,
        "vocab_size": tokenizer.vocab_size,
    }
