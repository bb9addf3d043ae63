"""Reading and writing a Hugging Face tokenizer directory.

Files read: `tokenizer.json` (preferred, except for Llama-class tokenizers such as MiniCPM's,
which are read from their SentencePiece model) or `tokenizer.model`; `tokenizer_config.json`,
`special_tokens_map.json`, `added_tokens.json` and `chat_template.jinja` when present.
As in transformers, a value in tokenizer_config.json wins over special_tokens_map.json, and a
chat_template.jinja file wins over the config's `chat_template`.

Files written: the model file as loaded (tokenizer.json or tokenizer.model), a
tokenizer_config.json that keeps the keys it was loaded with (updated with ours), and
special_tokens_map.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.tokenizer.backends import AddedToken

MODEL_FILES = ("tokenizer.json", "tokenizer.model")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Keys that describe the files of the original directory, not the tokenizer.
_DROPPED_KEYS = {"tokenizer_file", "vocab_file", "name_or_path", "auto_map", "added_tokens_decoder",
                 "chat_template", "special_tokens_map_file"}


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} if there is no such file (they are all optional)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniCPMError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise MiniCPMError(f"{path} should hold a JSON object, not {type(value).__name__}")
    return value


def token_text(value: Any) -> str | None:
    """A special-token value as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise MiniCPMError(f"a special token should be a string or {{'content': ...}}, got {value!r}")


def read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json merged with special_tokens_map.json and chat_template.jinja."""
    config = read_json(directory / "tokenizer_config.json")
    special_map = read_json(directory / "special_tokens_map.json")
    for key, value in special_map.items():
        if config.get(key) is None:
            config[key] = value
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    return config


def added_tokens(config: dict[str, Any], directory: Path) -> dict[int, AddedToken]:
    """`added_tokens_decoder` (and the older added_tokens.json) as {id: AddedToken}."""
    out: dict[int, AddedToken] = {}
    for content, token_id in read_json(directory / "added_tokens.json").items():
        out[int(token_id)] = AddedToken(content, special=False)
    for token_id, value in (config.get("added_tokens_decoder") or {}).items():
        try:
            out[int(token_id)] = AddedToken.from_json(value)
        except (KeyError, TypeError, ValueError):
            raise MiniCPMError(f"{directory / 'tokenizer_config.json'}: bad added_tokens_decoder "
                               f"entry {token_id!r}: {value!r}") from None
    return out


def extra_special_tokens(config: dict[str, Any]) -> list[str]:
    """`additional_special_tokens` (transformers 4) and `extra_special_tokens` (5), as text."""
    out: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        values = value.values() if isinstance(value, dict) else value
        out += [t for t in map(token_text, values) if t and t not in out]
    return out


def chat_templates(value: Any) -> dict[str, str]:
    """The config's chat_template: a string, or a list of {"name", "template"} entries."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys()
                                       for t in value):
        return {t["name"]: t["template"] for t in value}
    raise MiniCPMError("chat_template should be a string or a list of {'name', 'template'} entries")


def write(tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # A model file or template file of another kind left in the folder would win when loading.
    for stale in (*MODEL_FILES, "chat_template.jinja"):
        (directory / stale).unlink(missing_ok=True)
    tokenizer.backend.save(directory)
    special_map = {key: getattr(tokenizer, key) for key in NAMED_TOKENS}
    special_map = {key: value for key, value in special_map.items() if value is not None}
    if tokenizer.additional_special_tokens:
        special_map["additional_special_tokens"] = list(tokenizer.additional_special_tokens)
    for name, value in (("tokenizer_config.json", config_to_save(tokenizer)),
                        ("special_tokens_map.json", special_map)):
        text = json.dumps(value, ensure_ascii=False, indent=2) + "\n"
        (directory / name).write_text(text, encoding="utf-8")


def config_to_save(tokenizer) -> dict[str, Any]:
    """The loaded tokenizer_config.json, with every value we model replaced by ours."""
    config = {k: v for k, v in tokenizer.tokenizer_config.items() if k not in _DROPPED_KEYS}
    config.pop("extra_special_tokens", None)  # written as additional_special_tokens below
    config.update({key: getattr(tokenizer, key) for key in NAMED_TOKENS})
    config.setdefault("clean_up_tokenization_spaces", False)  # our decode never cleans up
    config["add_bos_token"] = tokenizer.add_bos_token
    config["add_eos_token"] = tokenizer.add_eos_token
    added = tokenizer.backend.added
    config["added_tokens_decoder"] = {str(i): token.to_json() for i, token in added.items()}
    if tokenizer.additional_special_tokens:
        config["additional_special_tokens"] = list(tokenizer.additional_special_tokens)
    if tokenizer.backend.kind == "spm":
        config.setdefault("tokenizer_class", "LlamaTokenizer")
        config["legacy"] = tokenizer.backend.legacy
    else:
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    templates = tokenizer.chat_templates
    if set(templates) == {"default"}:
        config["chat_template"] = templates["default"]
    elif templates:
        config["chat_template"] = [{"name": n, "template": t} for n, t in templates.items()]
    return config
