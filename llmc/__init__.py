"""llmc: compile Hugging Face causal LMs into target kernels, and serve them."""

__version__ = "0.1.0"
