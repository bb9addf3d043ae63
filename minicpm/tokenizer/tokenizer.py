"""`Tokenizer`: text <-> token ids and chat prompts for MiniCPM (and Llama-style) checkpoints.

One class over two engines (see backends.py): SentencePiece for `tokenizer.model` files and
GGUF "llama" vocabularies, `tokenizers` for `tokenizer.json` files and GGUF "gpt2" (byte-level
BPE) vocabularies. What transformers keeps in tokenizer_config.json (BOS/EOS flags, special
tokens, added tokens, chat template) lives here, and is written back by `save_pretrained`.

Behaviour follows transformers' LlamaTokenizer(legacy=True) for SentencePiece models, with one
deliberate exception: text that starts with a space (at the start or right after a special
token) gets SentencePiece's dummy-prefix space like any other text, as sentencepiece, the slow
LlamaTokenizer and llama.cpp do; transformers' fast tokenizer skips the prefix there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.tokenizer import gguf_vocab, hf_files, templates
from minicpm.tokenizer.backends import AddedToken, HfBackend, SpmBackend
from minicpm.tokenizer.stream import StreamDecoder

# End-of-turn tokens of common chat formats. `stop_token_ids` is the EOS id plus the id of each
# of these that the vocabulary has (plus GGUF's eot/eom ids): a chat model trained on ChatML
# ends its turn with <|im_end|> even when its EOS is </s>.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>",
                   "<end_of_turn>")
# transformers' LlamaTokenizer defaults, used by SentencePiece models whose config omits them.
_SPM_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class Tokenizer:
    """Use `from_pretrained(dir)` or `from_gguf_metadata(meta)` rather than the constructor."""

    def __init__(self, backend: SpmBackend | HfBackend, *, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None,
                 pad_token: str | None = None, additional_special_tokens: list[str] = (),
                 add_bos_token: bool = False, add_eos_token: bool = False,
                 chat_templates: dict[str, str] | None = None, chat_format: str | None = None,
                 tokenizer_config: dict[str, Any] | None = None, extra_stop_ids: list[int] = (),
                 gguf_pre: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_templates = dict(chat_templates or {})
        if chat_format is not None:
            templates.builtin_template(chat_format)  # fail early on a bad name
        self.chat_format = chat_format
        # tokenizer_config.json as loaded: keys we do not model are written back unchanged
        self.tokenizer_config = dict(tokenizer_config or {})
        self._extra_stop_ids = [i for i in extra_stop_ids if i is not None]
        self._gguf_pre = gguf_pre
        self._register_special_tokens()

    def _register_special_tokens(self) -> None:
        """Named and additional special tokens are cut out of text like added tokens (as in
        transformers); one missing from the vocabulary gets the next free id."""
        missing = [AddedToken(text, special=True) for text in self._special_texts()
                   if self.backend.id_of(text) not in self.backend.added]
        if missing and isinstance(self.backend, SpmBackend):
            added, next_id = dict(self.backend.added), len(self.backend)
            for token in missing:
                token_id = self.backend.id_of(token.content)
                if token_id is None:
                    token_id, next_id = next_id, next_id + 1
                added[token_id] = token
            self.backend = SpmBackend(self.backend.proto, added, self.backend.legacy)
        elif missing:
            self.backend.add_tokens(missing)
        self._special_ids = frozenset(i for i, t in self.backend.added.items() if t.special)

    def _special_texts(self) -> list[str]:
        named = [self.bos_token, self.eos_token, self.unk_token, self.pad_token]
        return [t for t in dict.fromkeys(named + self.additional_special_tokens) if t]

    # --- loading --------------------------------------------------------------------------------
    @staticmethod
    def exists(directory: str | Path) -> bool:
        """Whether `directory` holds a tokenizer.json or tokenizer.model."""
        return any((Path(directory) / name).is_file() for name in hf_files.MODEL_FILES)

    @classmethod
    def from_pretrained(cls, directory: str | Path, chat_format: str | None = None) -> Tokenizer:
        """Load a Hugging Face tokenizer directory: tokenizer.json, else tokenizer.model
        (tokenizer.model first for Llama-class tokenizers, see `_model_file`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MiniCPMError(f"{directory} is not a directory")
        config = hf_files.read_config(directory)
        added = hf_files.added_tokens(config, directory)
        named = {key: hf_files.token_text(config.get(key)) for key in hf_files.NAMED_TOKENS}
        path = _model_file(directory, config)
        if path.name == "tokenizer.json":
            backend = _load_tokenizer_json(path)
            backend.add_tokens([t for _, t in sorted(added.items())
                                if backend.id_of(t.content) is None])
            add_bos, add_eos = _post_processor_flags(backend, named)
        else:
            backend = SpmBackend(path.read_bytes(), added, legacy=config.get("legacy") is not False,
                                 source=str(path))
            named = {key: named[key] if key in config else _SPM_DEFAULTS.get(key) for key in named}
            add_bos, add_eos = True, False
        return cls(backend, **named,
                   additional_special_tokens=hf_files.extra_special_tokens(config),
                   add_bos_token=bool(config.get("add_bos_token", add_bos)),
                   add_eos_token=bool(config.get("add_eos_token", add_eos)),
                   chat_templates=hf_files.chat_templates(config.get("chat_template")),
                   chat_format=chat_format, tokenizer_config=config)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], chat_format: str | None = None) -> Tokenizer:
        """From a GGUF file's `tokenizer.*` keys, already converted to Python values."""
        model = meta.get("tokenizer.ggml.model")
        if model == "llama":
            backend = gguf_vocab.spm_from_gguf(meta)
        elif model == "gpt2":
            backend = gguf_vocab.bpe_from_gguf(meta)
        else:
            raise MiniCPMError(f"GGUF tokenizer model {model!r} is not supported (only 'llama' "
                               "SentencePiece and 'gpt2' byte-level BPE)")
        ids = gguf_vocab.special_ids(meta)
        named = {f"{name}_token": None if ids[name] is None else backend.token_of(ids[name])
                 for name in ("bos", "eos", "unk", "pad")}
        default_bos = gguf_vocab.adds_bos_by_default(model, meta.get("tokenizer.ggml.pre"))
        template = meta.get("tokenizer.chat_template")
        return cls(backend, **named,
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   chat_templates={"default": template} if template else None,
                   chat_format=chat_format, extra_stop_ids=[ids["eot"], ids["eom"]],
                   gguf_pre=meta.get("tokenizer.ggml.pre") if model == "gpt2" else None)

    # --- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json or tokenizer.model, tokenizer_config.json and
        special_tokens_map.json; `from_pretrained` and transformers' AutoTokenizer load them."""
        directory = Path(directory)
        hf_files.write(self, directory)
        return directory

    def to_gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` GGUF keys llama.cpp reads (inverse of `from_gguf_metadata`)."""
        if isinstance(self.backend, SpmBackend):
            meta = gguf_vocab.spm_to_gguf(self.backend)
        else:
            meta = gguf_vocab.bpe_to_gguf(self.backend, self._gguf_pre)
        k = "tokenizer.ggml."
        for name, token_id in (("bos", self.bos_token_id), ("eos", self.eos_token_id),
                               ("unknown", self.unk_token_id), ("padding", self.pad_token_id)):
            if token_id is not None:
                meta[f"{k}{name}_token_id"] = token_id
        meta[k + "add_bos_token"] = self.add_bos_token
        meta[k + "add_eos_token"] = self.add_eos_token
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta

    # --- ids ------------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.id_of(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.token_of(int(token_id))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return len(self.backend)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS, then every end-of-turn token of CHAT_END_TOKENS the vocabulary has."""
        ends = [self.token_to_id(t) for t in CHAT_END_TOKENS]
        ids = [self.eos_token_id, *ends, *self._extra_stop_ids]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def active_chat_template(self) -> str:
        """The template `apply_chat_template` uses when not given a `chat_format`."""
        return self._template_for(self.chat_format)

    # --- text -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. "</s>") maps to its id.
        With `add_special_tokens`, BOS/EOS are added as tokenizer_config.json says."""
        if not isinstance(text, str):
            raise MiniCPMError(f"encode() needs a string, got {type(text).__name__}")
        ids = self.backend.encode(text)
        if add_special_tokens:
            ids = self._with_bos_eos(ids)
        return ids

    def _with_bos_eos(self, ids: list[int], eos: bool = True) -> list[int]:
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if eos and self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ints, or anything `int()` accepts); unknown ids decode to nothing."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.backend.decode(ids)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An object whose `push(id)` returns the newly final text and `flush()` the rest."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, chat_format: str | None = None,
                            **extra: Any) -> str | list[int]:
        """The prompt for `messages` ([{"role", "content"}, ...]) as text, or ids if `tokenize`.

        Template: the `chat_format` argument (a built-in format), else `self.chat_format`, else
        the checkpoint's template, else the built-in format `default_chat_format()`. `extra`
        keywords are visible to the template, as in transformers. With `tokenize`, BOS is
        added as `encode` adds it unless the text already starts with it; EOS is never added
        (transformers adds neither: its chat templates carry their own BOS).
        """
        messages = templates.check_messages(messages)
        template = self._template_for(chat_format or self.chat_format)
        context = {key: getattr(self, key) for key in hf_files.NAMED_TOKENS}
        context["additional_special_tokens"] = self.additional_special_tokens
        text = templates.render(template, messages, add_generation_prompt, {**context, **extra})
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        if self.bos_token and text.startswith(self.bos_token):
            return ids
        return self._with_bos_eos(ids, eos=False)

    def default_chat_format(self) -> str:
        """The built-in format for checkpoints without a template: "chatml" if the vocabulary
        has <|im_start|> and <|im_end|> (MiniCPM-2B-128k), else "minicpm"."""
        has_chatml = all(self.token_to_id(t) is not None for t in ("<|im_start|>", "<|im_end|>"))
        return "chatml" if has_chatml else "minicpm"

    def _template_for(self, chat_format: str | None) -> str:
        if chat_format is not None:
            return templates.builtin_template(chat_format)
        return self.chat_template or templates.builtin_template(self.default_chat_format())

    def __repr__(self) -> str:
        return (f"Tokenizer({self.backend.kind}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, add_bos={self.add_bos_token})")


def _model_file(directory: Path, config: dict[str, Any]) -> Path:
    """tokenizer.json if present, else tokenizer.model; but a Llama-class tokenizer (MiniCPM's)
    that ships both is read from tokenizer.model: its tokenizer.json is a conversion that
    differs from the SentencePiece model on text starting with a space, and only the
    SentencePiece model carries the scores a GGUF file needs."""
    json_file, spm_file = directory / "tokenizer.json", directory / "tokenizer.model"
    llama_class = config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast")
    if spm_file.is_file() and (llama_class or not json_file.is_file()):
        return spm_file
    if json_file.is_file():
        return json_file
    raise MiniCPMError(f"{directory} has no tokenizer.json or tokenizer.model")


def _load_tokenizer_json(path: Path) -> HfBackend:
    from tokenizers import Tokenizer as HfTokenizer

    try:
        return HfBackend(HfTokenizer.from_file(str(path)))
    except Exception as e:  # noqa: BLE001 (`tokenizers` raises plain Exceptions on bad files)
        raise MiniCPMError(f"{path} is not a valid tokenizer.json: {e}") from None


def _post_processor_flags(backend: HfBackend, named: dict[str, str | None]) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS / EOS (used when the config is silent)."""
    ids = backend.tok.encode("", add_special_tokens=True).ids
    bos, eos = (backend.id_of(named[k]) if named[k] else None for k in ("bos_token", "eos_token"))
    return bool(ids) and ids[0] == bos, bool(ids) and ids[-1] == eos
