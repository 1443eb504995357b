"""The weights' huge-page region: aligned, zeroed, carved without overlap, and on a Linux
kernel that offers transparent huge pages actually backed by them."""

import numpy as np
import pytest

from llmc.runtime.hugepages import HUGE_PAGE, Arena, huge_page_buffer


def test_buffer_is_aligned_zeroed_and_writable():
    buf = huge_page_buffer(3 * HUGE_PAGE + 123)
    assert len(buf) == 3 * HUGE_PAGE + 123 and buf.dtype == np.uint8
    assert buf.ctypes.data % HUGE_PAGE == 0
    assert not buf[::4096].any() and buf[-1] == 0
    buf[:] = 7
    assert int(buf.sum()) == 7 * len(buf)


def test_arena_slices_are_aligned_and_disjoint():
    sizes = [10, 64, 65, 1, 4096 + 3]
    arena = Arena(sizes, 64)
    views = [arena.take(n) for n in sizes]
    for i, (v, n) in enumerate(zip(views, sizes)):
        assert len(v) == n and v.ctypes.data % 64 == 0
        v[:] = i + 1
    for i, v in enumerate(views):  # no later slice overwrote an earlier one
        assert (v == i + 1).all()
    with pytest.raises(ValueError, match="exhausted"):
        arena.take(1)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this kernel")
def test_region_gets_huge_pages():
    buf = huge_page_buffer(8 * HUGE_PAGE)
    buf[::4096] = 1  # fault every page in
    got = _anon_huge_kb(buf.ctypes.data)
    if got == 0:
        # the kernel may have no free 2 MiB pages at that moment (fragmented memory); the
        # request itself is what this runtime controls
        pytest.skip("the kernel gave no huge pages (memory fragmented?)")
    assert got >= 2048
