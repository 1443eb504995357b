"""The llmc runtime: loads compiled artifacts and serves them (installed as ``llmc.runtime``).

It imports nothing of the compiler and not transformers."""

from .artifact import ArtifactError
from .engine import Engine, GenerationStats
from .sampler import SamplingParams

__all__ = ["ArtifactError", "Engine", "GenerationStats", "SamplingParams"]
