#!/usr/bin/env python3
"""How far batching can pay on this CPU: the integer-dot linears of SmolLM2 at M = 1 (one
decode token: weights streamed from memory) against M = 8 (eight sequences' tokens in one
step), one thread, by thread CPU time.

A batched step reads each weight once for all its rows, so its linears cost at least the
larger of the weight stream and the integer arithmetic of 8 rows; ``8 * T1 / T8`` bounds what
8 concurrent clients can gain over one (issue 8 asks for 4x), before attention, sampling and
the rest of a step are counted. "cold" cycles through enough weight copies that every call
reads them from DRAM; "hot" reuses one copy (cache-resident: the arithmetic alone). One thread
is timed by its CPU clock; ``--threads 2`` by the wall clock (needs an idle machine), where
two threads share the memory bandwidth the single row is bound by.

The weight copies lie in one huge-page region, as a loaded artifact's do. ``--prefetch N``
sets the batched tiles' prefetch distance in 32-blocks (default ``intdot.batch_prefetch``: 8 on
VNNI, else none; 0 turns it off), for A/B runs of it.

    python benchmarks/batch_bound.py [--mcpu znver4] [--json benchmarks/results/batch_bound.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--threads" in sys.argv:  # the thread pool reads it once, at first use
    os.environ["TVM_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("TVM_NUM_THREADS", "1")

# SmolLM2-135M's linears per layer (n, k, count), the gated MLP's gate as its own kernel call;
# the 8-bit tied LM head is separate (one per step)
LAYER = [(576, 576, 2), (192, 576, 2), (1536, 576, 2), (576, 1536, 1)]
LAYERS = 30


def on_huge_pages(array, arena):
    """A TVM tensor over a copy of ``array`` carved from ``arena``: the weights of a loaded
    artifact lie in one huge-page region (runtime/hugepages.py), so the copies here do too (on
    4 KiB pages the cold figures would pay TLB misses the runtime does not)."""
    import tvm

    view = arena.take(array.nbytes).view(array.dtype).reshape(array.shape)
    view[...] = array
    return tvm.runtime.from_dlpack(view)


def weight_copies(rng, n: int, k: int, lanes: int, ilv: int, bits: int, copies: int) -> list[tuple]:
    """``copies`` random (codes, scales, mins) sets of an n x k integer-dot weight in its stored
    layout (interleaved by ``ilv``; float16 scales and mins), on huge pages: a benchmark cycles
    through them so that every call reads its weights from DRAM."""
    import numpy as np

    from llmc.runtime.hugepages import ALIGN, Arena

    blocks = n // lanes
    arrays = [(rng.integers(0, 2**31, (blocks // ilv, k // 32, ilv * bits * lanes), dtype=np.int32),
               rng.random((blocks // ilv, k // 32, ilv * lanes)).astype(np.float16),
               rng.random((blocks // ilv, k // 32, ilv * lanes)).astype(np.float16)) for _ in range(copies)]
    arena = Arena([a.nbytes for copy in arrays for a in copy], ALIGN)
    return [tuple(on_huge_pages(a, arena) for a in copy) for copy in arrays]


def measure(isa, cpu, n: int, k: int, m: int, copies: int, repeats: int, threads: int = 1,
            prefetch=None) -> float:
    """Median microseconds of one call of the integer-dot linear (Q4_1 layout: unsigned codes, mins)."""
    import numpy as np
    import tvm

    from llmc.compiler.codegen.tvm import intdot

    rng = np.random.default_rng(0)
    L, ilv = isa.lanes, intdot.weight_interleave(isa, n, 4)
    kernel = intdot.intdot_linear_kernel(isa, n, k, 32, False, True, "float16", m == 1, ilv=ilv,
                                           prefetch=prefetch)
    target = tvm.target.Target(cpu.tvm_target(threads))
    f = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target).jit()["main"]
    q = tvm.runtime.tensor(rng.integers(-127, 127, (m, k // 4), dtype=np.int32))
    d = tvm.runtime.tensor(rng.random((m, k // 32), dtype=np.float32))
    ds = tvm.runtime.tensor(rng.random((m, k // 32), dtype=np.float32))
    weights = weight_copies(rng, n, k, L, ilv, 4, copies)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    for w in weights[:2]:
        f(q, d, ds, *w, y)
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    times = []
    for r in range(repeats):
        w = weights[r % copies]
        t0 = clock()
        f(q, d, ds, *w, y)
        times.append(clock() - t0)
    return statistics.median(times) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mcpu", default=None, help="LLVM CPU (default: this host's)")
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=None,
                    help="32-blocks ahead the batched tiles prefetch (default: intdot.batch_prefetch; 0: none)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from llmc.compiler.codegen.llvm_cpu import resolve_cpu
    from llmc.compiler.codegen.tvm import intdot

    built = resolve_cpu(args.mcpu)
    mcpu = built.name
    isa = intdot.int_dot_isa(built.arch, built.required_flags)
    if isa is None:
        print(f"{mcpu}: no integer dot product; nothing to measure", file=sys.stderr)
        return 1
    rows, totals = [], {"m1_cold": 0.0, "m8_hot": 0.0, "m8_cold": 0.0}
    print(f"{mcpu} ({isa.name}), {args.threads} thread(s), microseconds per call (medians of {args.repeats})")
    print(f"{'n x k':>12} {'calls/step':>10} {'M=1 cold':>9} {'M=8 hot':>8} {'M=8 cold':>9} {'8*T1/T8':>8}")
    for n, k, count in LAYER:
        copies = max(2, (64 << 20) // (n * k // 2))  # > 64 MB of weights: past every cache
        r = {"n": n, "k": k, "calls": count * LAYERS,
             "m1_cold": measure(isa, built, n, k, 1, copies, args.repeats, args.threads),
             "m8_hot": measure(isa, built, n, k, 8, 1, args.repeats, args.threads, args.prefetch),
             "m8_cold": measure(isa, built, n, k, 8, copies, args.repeats, args.threads, args.prefetch)}
        rows.append(r)
        for key in totals:
            totals[key] += r[key] * r["calls"] / 1e3
        print(f"{n:>6} x {k:<5} {r['calls']:>10} {r['m1_cold']:>9.1f} {r['m8_hot']:>8.1f} {r['m8_cold']:>9.1f} "
              f"{8 * r['m1_cold'] / r['m8_cold']:>8.2f}")
    bound_hot = 8 * totals["m1_cold"] / totals["m8_hot"]
    bound_cold = 8 * totals["m1_cold"] / totals["m8_cold"]
    print(f"all 4-bit linears of a step: M=1 {totals['m1_cold']:.2f} ms, M=8 {totals['m8_cold']:.2f} ms "
          f"(arithmetic alone {totals['m8_hot']:.2f} ms): 8 clients can gain at most {bound_cold:.2f}x over one "
          f"({bound_hot:.2f}x if the weight stream were free)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"mcpu": mcpu, "isa": isa.name, "threads": args.threads, "rows": rows, "totals_ms": totals,
                       "bound_8_over_1": bound_cold, "bound_if_weights_free": bound_hot}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
