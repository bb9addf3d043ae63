"""Generation: sampling, the shared token generator, text streaming with stop strings, chat."""

from minicpm.generation.generate import TokenGenerator, generate
from minicpm.generation.sampling import SamplingParams, sample_next

__all__ = ["TokenGenerator", "generate", "SamplingParams", "sample_next"]
