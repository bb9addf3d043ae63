"""Chat templates: the checkpoint's Jinja template, or a built-in format, rendered to a prompt.

Templates run in a sandboxed Jinja environment set up the way transformers sets it up
(`trim_blocks`, `lstrip_blocks`, the loop-controls extension, a `tojson` that keeps non-ASCII
text, `raise_exception`, `strftime_now`), so a checkpoint's template renders here exactly as
`tokenizer.apply_chat_template(..., tokenize=False)` renders it there.

Built-in formats, used when a checkpoint has no template or when one is asked for by name:
- "minicpm": the official MiniCPM-2B/1B/MoE template. A user turn renders as
  `<用户>` + content.strip() + `<AI>`; every other role (assistant, and also system) renders as
  its stripped content with no marker, so a system prompt is plain text before the first
  `<用户>`. The template ends user turns with `<AI>` itself, so `add_generation_prompt` changes
  nothing. No BOS in the text: the tokenizer adds it when encoding.
- "chatml": `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, plus
  `<|im_start|>assistant\\n` when `add_generation_prompt` (MiniCPM-2B-128k); no default system
  prompt.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from minicpm.errors import MiniCPMError

MINICPM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{'<用户>' + message['content'].strip() + '<AI>'}}"
    "{% else %}{{message['content'].strip()}}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_FORMATS = {"minicpm": MINICPM_TEMPLATE, "chatml": CHATML_TEMPLATE}


def builtin_template(chat_format: str) -> str:
    if chat_format not in CHAT_FORMATS:
        raise MiniCPMError(f"unknown chat_format {chat_format!r}; known: {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[chat_format]


def check_messages(messages: Any) -> list[dict]:
    """The messages as a list of dicts with string `role` and `content`, or a clear error."""
    if not isinstance(messages, (list, tuple)):
        raise MiniCPMError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MiniCPMError(f"message {i} must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise MiniCPMError(f"message {i} has no {key!r}: {message!r}")
            if not isinstance(message[key], str):
                raise MiniCPMError(f"message {i} {key!r} must be a string, "
                                   f"got {type(message[key]).__name__}")
    return list(messages)


def render(template: str, messages: list[dict], add_generation_prompt: bool,
           context: dict[str, Any]) -> str:
    """Render `template`; a template's own `raise_exception` becomes a MiniCPMError."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **context)
    except jinja2.TemplateError as e:
        raise MiniCPMError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    extensions = [_generation_extension(), "jinja2.ext.loopcontrols"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise MiniCPMError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


def _raise_exception(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.cache
def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) rendered as their body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return GenerationBlock
