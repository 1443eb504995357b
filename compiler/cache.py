"""Where llmc keeps what it can reuse between compiles (GGUF conversions, compiled kernels).

One root for every cache so a user can move it (``LLMC_CACHE_DIR``) or bypass it
(``LLMC_NO_CACHE=1``, or ``llmc compile --no-cache``) in one place.
"""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$LLMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmc``, else ``~/.cache/llmc``."""
    if os.environ.get("LLMC_CACHE_DIR"):
        return os.environ["LLMC_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmc")


def caching_disabled() -> bool:
    """True when LLMC_NO_CACHE is set: nothing is read from or written to the caches."""
    return os.environ.get("LLMC_NO_CACHE", "") not in ("", "0")
