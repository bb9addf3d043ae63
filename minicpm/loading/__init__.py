"""Loading, the core half: where a model comes from (`source`: a directory, a .gguf file, a hub
id, the default model) and how named tensors from any checkpoint format become a model
(`assemble`, which imports torch). Reading each format is `minicpm.formats`'s job;
`minicpm.load` joins the two.
"""

from minicpm.loading.source import (
    DEFAULT_MODEL_ALIASES,
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    default_model_path,
    locate,
    names_default_model,
    resolve,
)

__all__ = ["DEFAULT_MODEL_ALIASES", "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NAME", "default_model_path",
           "locate", "names_default_model", "resolve"]
