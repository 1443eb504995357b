"""The cpu executor's step inputs: the seven int64 arrays packed into one aligned buffer that
TVM borrows through DLPack (TVM refuses memory aligned to less than 64 bytes)."""

import numpy as np

from llmc.runtime.executor_cpu import ALIGN, pack_int64


def test_pack_int64_keeps_values_and_shapes_and_aligns_each_array():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-5, 1000, size=n) for n in (1, 7, 9, 0)] + [rng.integers(0, 50, size=(3, 5)).astype(np.int32),
                                                                        np.array([0, 4, 9])]
    packed = pack_int64(arrays)
    for a, p in zip(arrays, packed):
        assert p.dtype == np.int64 and p.shape == a.shape and np.array_equal(p, a)
        assert p.ctypes.data % ALIGN == 0 and p.flags.c_contiguous
    first = packed[0].ctypes.data  # one buffer, no overlap
    spans = sorted((p.ctypes.data - first, p.ctypes.data - first + p.nbytes) for p in packed)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
