"""An ollama Modelfile for a GGUF file we wrote: `ollama create NAME -f OUT.Modelfile`.

It is written next to the GGUF as `<stem>.Modelfile` (not `Modelfile`), so several exports in one
folder (q4_0, q8_0, ...) each keep their own. It holds:

- `FROM ./<file>.gguf`, relative, so the pair can be moved together;
- `TEMPLATE`: the model's chat format in ollama's Go-template syntax, over `.Messages` so that a
  multi-turn conversation renders as our `apply_chat_template` renders it. Two formats are known:
  MiniCPM's `<用户>{user}<AI>` (system and assistant text inline, no markers) and ChatML. Which
  one is found by rendering a probe conversation with the tokenizer's own template; a template
  that is neither falls back to the vocabulary's default format, with a warning. One difference
  remains: MiniCPM's Jinja template strips each message, Go templates cannot;
- `SYSTEM`: a default system prompt the checkpoint's template inserts (SmolLM2 has one);
- `PARAMETER stop`: the EOS text, end-of-turn tokens the vocabulary has, and the format's turn
  markers (for MiniCPM, `<用户>` is several tokens, so only a stop string catches it);
- `PARAMETER temperature 0.3` / `top_p 0.8`: the official `chat()` defaults (MiniCPM's
  modeling code; its llama.cpp example uses the same pair), which `minicpm chat` also uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from minicpm.errors import MiniCPMError
from minicpm.files import write_text

logger = logging.getLogger(__name__)

TEMPERATURE = 0.3
TOP_P = 0.8

# Go templates over ollama's .Messages (each has .Role and .Content); every character outside
# the actions is emitted as written.
GO_TEMPLATES = {
    "minicpm": ('{{ range .Messages }}{{ if eq .Role "user" }}<用户>{{ .Content }}<AI>'
                '{{ else }}{{ .Content }}{{ end }}{{ end }}'),
    "chatml": ('{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
               '{{ end }}<|im_start|>assistant\n'),
}
FORMAT_STOPS = {"minicpm": ("<用户>", "<AI>"), "chatml": ("<|im_end|>", "<|im_start|>")}

# A probe conversation: distinctive texts, so the system prompt can be cut out of a rendering.
_PROBE = [{"role": "user", "content": "PROBE-U1"}, {"role": "assistant", "content": "PROBE-A1"},
          {"role": "user", "content": "PROBE-U2"}]
_SYSTEM_MARK = "PROBE-SYSTEM"


def modelfile_path(gguf_path: str | Path) -> Path:
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def write_modelfile(gguf_path: str | Path, tokenizer: Any) -> Path:
    """Write `<stem>.Modelfile` next to `gguf_path`; returns its path."""
    path = modelfile_path(gguf_path)
    write_text(path, modelfile_text(Path(gguf_path).name, tokenizer))
    return path


def modelfile_text(gguf_name: str, tokenizer: Any) -> str:
    chat_format, system = detect_chat_format(tokenizer)
    lines = [f"# ollama create <name> -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{GO_TEMPLATES[chat_format]}"""']
    if system:
        lines.append(f'SYSTEM """{_triple_quotable(system)}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stop_strings(tokenizer, chat_format)]
    lines += [f"PARAMETER temperature {TEMPERATURE}", f"PARAMETER top_p {TOP_P}"]
    return "\n".join(lines) + "\n"


def detect_chat_format(tokenizer: Any) -> tuple[str, str | None]:
    """(format, default system prompt or None) that reproduce the tokenizer's chat template."""
    for chat_format in ("minicpm", "chatml"):
        system = _matching_system(tokenizer, chat_format)
        if system is not None:
            return chat_format, system or None
    fallback = tokenizer.default_chat_format()
    logger.warning("the chat template is neither MiniCPM's nor ChatML; the Modelfile uses %s",
                   fallback)
    return fallback, None


def _matching_system(tokenizer: Any, chat_format: str) -> str | None:
    """None if the tokenizer's template differs from `chat_format`; else the default system
    prompt it inserts ("" for none)."""
    system = [{"role": "system", "content": _SYSTEM_MARK}]
    ours = tokenizer.apply_chat_template(system + _PROBE)
    builtin = tokenizer.apply_chat_template(system + _PROBE, chat_format=chat_format)
    if _without_bos(tokenizer, ours, builtin) != builtin:
        return None
    plain = _without_bos(tokenizer, tokenizer.apply_chat_template(_PROBE), builtin)
    if plain == tokenizer.apply_chat_template(_PROBE, chat_format=chat_format):
        return ""
    # The template added a system turn of its own: it is what stands where the mark stood.
    before, _, after = builtin.partition(_SYSTEM_MARK)
    if plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return None


def _without_bos(tokenizer: Any, text: str, builtin: str) -> str:
    # Templates that write BOS themselves (ollama adds it from the GGUF's add_bos flag instead);
    # but a BOS that is the format's own first marker (SmolLM2's BOS is <|im_start|>) stays.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and not builtin.startswith(bos):
        return text[len(bos):]
    return text


def stop_strings(tokenizer: Any, chat_format: str) -> list[str]:
    """EOS text, end-of-turn tokens, then the format's markers; each once, in that order."""
    from minicpm.tokenizer.tokenizer import CHAT_END_TOKENS

    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [t for t in CHAT_END_TOKENS if tokenizer.token_to_id(t) is not None]
    stops += FORMAT_STOPS[chat_format]
    return list(dict.fromkeys(stops))


def _quoted(text: str) -> str:
    if '"' in text or "\n" in text:
        raise MiniCPMError(f"stop string {text!r} cannot be written in a Modelfile")
    return f'"{text}"'


def _triple_quotable(text: str) -> str:
    if '"""' in text:
        raise MiniCPMError('a system prompt containing """ cannot be written in a Modelfile')
    return text
