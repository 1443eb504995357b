"""Memory for a loaded artifact: ALIGN-byte aligned buffers TVM can share through DLPack,
and the weights' region on transparent huge pages (Linux; a plain aligned buffer elsewhere).

Why: a decode step streams every weight once (~100 MB for SmolLM2 Q4_1). In 4 KiB pages that
is ~25,000 TLB misses a step, each a page walk the hardware prefetchers cannot run ahead of;
in 2 MiB pages ~50. Measured on Zen 4, 2 threads, same process A/B
(benchmarks/step_profile.py --steps-only): one sequence's decode step 4.64 -> 4.37 ms (-6%),
an 8-sequence step 11.73 -> 11.50 ms. Most distros leave THP at ``madvise``, so the region
has to ask for it (``MADV_HUGEPAGE``). The weights are read in whole, so the only cost is
rounding the region up to 2 MiB. The KV pools are not asked for here: they are touched block
by block (numpy already advises huge pages for its large allocations; `perf` shows the pools'
first writes faulting 2 MiB pages in).
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
ALIGN = 64  # TVM refuses to share (DLPack) memory aligned to less


def aligned_zeros(shape: tuple, dtype: str) -> np.ndarray:
    """A zeroed array of ``shape`` starting ALIGN-byte aligned (lazily mapped zero pages)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    offset = (-buf.ctypes.data) % ALIGN
    return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer of ``nbytes`` whose start is ALIGN-byte aligned."""
    buf = np.empty(nbytes + ALIGN, dtype=np.uint8)
    offset = (-buf.ctypes.data) % ALIGN
    return buf[offset:offset + nbytes]


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A zero-filled uint8 buffer of ``nbytes`` starting on a 2 MiB boundary, backed by huge
    pages where the kernel offers them (anonymous mmap + MADV_HUGEPAGE); the kernel still
    maps pages lazily, and a kernel without THP gives ordinary pages. The array keeps the
    mapping alive."""
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no anonymous private mappings through this API
        return aligned_zeros((nbytes,), "uint8")
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
    """Carves ``align``-aligned slices out of one huge-page buffer sized up front, so many
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
