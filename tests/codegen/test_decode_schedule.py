"""Decode-step kernels small enough to lose more to a thread-pool launch than they gain from a
second thread run on the calling thread (schedule.SERIAL_EXTENT); prefill kernels and large
decode kernels stay parallel. The results are equal either way."""

import numpy as np
import tvm
from tvm import te

from llmc.compiler.codegen.tvm.schedule import SERIAL_EXTENT, schedule_primfunc


def _scaled_add(n):
    a = te.placeholder((1, n), "float32", name="a")
    b = te.placeholder((1, n), "float32", name="b")
    c = te.compute((1, n), lambda i, j: a[i, j] * 2.0 + b[i, j], name="c")
    return te.create_prim_func([a, b, c])


def _run(func, n):
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm").jit()["main"]
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((1, n), dtype=np.float32), rng.standard_normal((1, n), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    f(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_allclose(out.numpy(), a * 2 + b, rtol=1e-6)


def test_small_decode_kernels_run_serial_large_ones_parallel():
    small, large = 576, 2 * SERIAL_EXTENT
    assert "T.parallel" not in schedule_primfunc(_scaled_add(small), decode=True).script()
    assert "T.parallel" in schedule_primfunc(_scaled_add(small), decode=False).script()
    assert "T.parallel" in schedule_primfunc(_scaled_add(large), decode=True).script()
    for n in (small, large):
        _run(schedule_primfunc(_scaled_add(n), decode=True), n)
