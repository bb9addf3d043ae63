"""Tokenizers and chat templates for MiniCPM checkpoints.

    from minicpm.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained("path/to/MiniCPM-2B-sft-bf16")
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True)

Files: tokenizer.py (the `Tokenizer` class), backends.py (SentencePiece and `tokenizers`
engines), hf_files.py (Hugging Face directory layout), gguf_vocab.py (GGUF `tokenizer.*` keys),
chat.py (Jinja chat templates and the built-in MiniCPM/ChatML formats), stream.py (incremental
detokenization for streaming generation).
"""

from minicpm.tokenizer.stream import StreamDecoder
from minicpm.tokenizer.templates import CHAT_FORMATS
from minicpm.tokenizer.tokenizer import CHAT_END_TOKENS, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "CHAT_FORMATS", "CHAT_END_TOKENS"]
