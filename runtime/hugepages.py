"""Memory for a loaded artifact's weights on transparent huge pages (Linux), with a plain
aligned allocation everywhere else.

Why: a decode step streams every weight once (~100 MB for SmolLM2 Q4_1). In 4 KiB pages that
is ~25,000 TLB misses a step, each a page walk the hardware prefetchers cannot run ahead of;
in 2 MiB pages ~50. Measured on Zen 4, 2 threads, same process A/B
(benchmarks/step_profile.py --steps-only): one sequence's decode step 4.64 -> 4.37 ms (-6%),
an 8-sequence step 11.73 -> 11.50 ms. Most distros leave THP at ``madvise``, so the region
has to ask for it (``MADV_HUGEPAGE``). The weights are read in whole, so the only cost is
rounding the region up to 2 MiB. The KV pools stay on ordinary pages: they are touched block
by block, and a huge page would make the first block of each layer's pool cost 2 MiB of
resident memory.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A zero-filled uint8 buffer of ``nbytes`` starting on a 2 MiB boundary, backed by huge
    pages where the kernel offers them (anonymous mmap + MADV_HUGEPAGE); the kernel still
    maps pages lazily, and a kernel without THP gives ordinary pages. The array keeps the
    mapping alive."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no anonymous private mappings through this API
        buf = np.zeros(nbytes + 64, dtype=np.uint8)
        start = (-buf.ctypes.data) % 64
        return buf[start:start + nbytes]
    size = -(-(max(nbytes, 1) + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError:  # THP disabled ("never") or unsupported: ordinary pages
            pass
    buf = np.frombuffer(region, dtype=np.uint8)
    start = (-buf.ctypes.data) % HUGE_PAGE
    return buf[start:start + nbytes]


class Arena:
    """Carves ``ALIGN``-aligned slices out of one huge-page buffer sized up front, so many
    weights share the huge pages instead of each rounding up to its own."""

    def __init__(self, sizes, align: int):
        self.align = align
        self.buffer = huge_page_buffer(sum(self._padded(n) for n in sizes))
        self.at = 0

    def _padded(self, n: int) -> int:
        return -(-max(n, 1) // self.align) * self.align

    def take(self, nbytes: int) -> np.ndarray:
        if self.at + nbytes > len(self.buffer):
            raise ValueError(f"arena exhausted: {nbytes} bytes asked, {len(self.buffer) - self.at} left")
        view = self.buffer[self.at:self.at + nbytes]
        self.at += self._padded(nbytes)
        return view
