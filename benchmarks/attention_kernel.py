"""Time llmc's cpu attention kernel alone (SmolLM2 shapes: 9 query heads, 3 KV heads, dim 64).

    python benchmarks/attention_kernel.py --tokens 512

Prefill at 512 tokens is attention-bound; this isolates the kernel for schedule work."""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import te, tirx as tir  # noqa: E402

from llmc.compiler.codegen.tvm.lower import CTX_BLOCK, _attention_te  # noqa: E402
from llmc.compiler.codegen.tvm.schedule import schedule_primfunc  # noqa: E402
from llmc.runtime.cpu_features import host_mcpu  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="queries = cached positions (a prefill)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t, s, h, hkv, d = args.tokens, 2048, 9, 3, 64
    tv, blocks = tir.Var("T", "int64"), tir.Var("ctx_blocks", "int64")
    q = te.placeholder((tv, h, d), name="q")
    kc, vc = te.placeholder((hkv, d, s), name="kc"), te.placeholder((s, hkv, d), name="vc")  # artifact layouts
    pos = te.placeholder((tv,), "int64", name="pos")
    out = _attention_te(q, kc, vc, pos, blocks * CTX_BLOCK, {"scale": 0.125, "window": 0, "softcap": 0.0})
    func = schedule_primfunc(te.create_prim_func([q, kc, vc, pos, out, blocks]), decode=False)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": args.threads})
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target).jit()
    rng = np.random.default_rng(0)
    tensors = [rng.random(shape, dtype=np.float32) for shape in ((t, h, d), (hkv, d, s), (s, hkv, d))]
    call = [tvm.runtime.tensor(a) for a in tensors] + [tvm.runtime.tensor(np.arange(t)),
                                                       tvm.runtime.empty((t, h, d), "float32"), -(-t // CTX_BLOCK)]
    lib["main"](*call)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        lib["main"](*call)
        times.append(time.perf_counter() - t0)
    print(f"attention, {t} queries over {t} positions: {np.median(times) * 1e3:.2f} ms per layer (median of 7)")


if __name__ == "__main__":
    main()
