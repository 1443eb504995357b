"""The llmc runtime: loads compiled artifacts and serves them (installed as ``llmc.runtime``).

It imports nothing of the compiler and not transformers."""
