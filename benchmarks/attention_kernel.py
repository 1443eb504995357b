"""Time llmc's cpu attention kernels alone (SmolLM2 shapes: 9 query heads, 3 KV heads, dim 64).

    python benchmarks/attention_kernel.py --tokens 512

Prefill at 512 tokens used to be attention-bound; this isolates the kernels for schedule work:
``prefill`` is the flash-style TIR kernel the prefill entry point uses, ``te`` the TE-stage
kernel the decode entry point uses (timed here on a whole prompt, for comparison). Both are
checked against a numpy reference before they are timed."""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import te, tirx as tir  # noqa: E402

from llmc.compiler.codegen.tvm.attention import attention_te, prefill_attention  # noqa: E402
from llmc.compiler.codegen.tvm.lower import CTX_BLOCK  # noqa: E402
from llmc.compiler.codegen.tvm.schedule import schedule_primfunc  # noqa: E402
from llmc.runtime.cpu_features import host_mcpu  # noqa: E402

H, HKV, D, S, SCALE = 9, 3, 64, 2048, 0.125


def reference(q, kc, vc, t):
    out = np.zeros((t, H, D), np.float32)
    for h in range(H):
        scores = (q[:, h, :] @ kc[h // (H // HKV)]) * SCALE
        scores = np.where(np.arange(S)[None, :] <= np.arange(t)[:, None], scores, -np.inf)
        p = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h, :] = (p / p.sum(1, keepdims=True)) @ vc[:, h // (H // HKV), :]
    return out


def build(kind):
    if kind == "prefill":
        return prefill_attention(H, HKV, D, D, S, SCALE, 0, 0.0), False
    tv, blocks = tir.Var("T", "int64"), tir.Var("ctx_blocks", "int64")
    q = te.placeholder((tv, H, D), name="q")
    kc, vc = te.placeholder((HKV, D, S), name="kc"), te.placeholder((S, HKV, D), name="vc")
    pos = te.placeholder((tv,), "int64", name="pos")
    out = attention_te(q, kc, vc, pos, blocks * CTX_BLOCK, {"scale": SCALE, "window": 0, "softcap": 0.0})
    return schedule_primfunc(te.create_prim_func([q, kc, vc, pos, out, blocks]), decode=False), True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="queries = cached positions (a prefill)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    t = args.tokens
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": args.threads})
    rng = np.random.default_rng(0)
    q, kc, vc = (rng.standard_normal(shape, dtype=np.float32) for shape in ((t, H, D), (HKV, D, S), (S, HKV, D)))
    want = reference(q, kc, vc, t)
    for kind in ("prefill", "te"):
        func, takes_blocks = build(kind)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
        out = tvm.runtime.empty((t, H, D), "float32")
        call = [tvm.runtime.tensor(a) for a in (q, kc, vc, np.arange(t))] + [out]
        call += [-(-t // CTX_BLOCK)] if takes_blocks else []
        lib["main"](*call)
        err = np.abs(out.numpy() - want).max()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            lib["main"](*call)
            times.append(time.perf_counter() - t0)
        print(f"{kind:8s} attention, {t} queries over {t} positions: {np.median(times) * 1e3:7.2f} ms per layer "
              f"(median of {args.repeats}; max abs error vs numpy {err:.1e})")


if __name__ == "__main__":
    main()
