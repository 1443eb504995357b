#!/usr/bin/env python3
"""Integer-dot linears at a few rows (2-8 decode tokens in a step: a few clients, or one
speculative request checking its guesses), by tile, with the weights streamed from DRAM.

Each variant is built for SmolLM2's linear shapes (its four 4-bit ones, or with ``--bits 8``
the 8-bit tied LM head), and the variants are timed interleaved, call by call, each cycling
through weight copies of its own on huge pages (so none reads what another just cached), by
the wall clock of ``--threads`` threads (needs an idle machine). A variant is ``auto`` (the
kernel's own choice per row count: what an artifact runs), ``decode`` (the one-row decode
tile, row after row), or ``RxC`` register tiles, with ``pN`` for a prefetch distance of N
32-blocks (``4x1p8``). Prints, per shape and in total per step, the median microseconds.

    python benchmarks/small_batch.py --rows 2 3 4 6 --tiles auto 4x1p8 8x1p8 decode
    python benchmarks/small_batch.py --mcpu x86-64-v3 --rows 2 3 --tiles auto 4x1p0
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
os.environ.setdefault("TVM_NUM_THREADS", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batch_bound import LAYER, LAYERS, weight_copies  # noqa: E402

LM_HEAD = (49152, 576)


def parse_tile(spec: str):
    """(decode, tile, prefetch) for the kernel builder."""
    if spec == "auto":
        return False, None, None
    if spec == "decode":
        return True, None, None
    tile, _, ahead = spec.partition("p")
    rows, blocks = (int(x) for x in tile.split("x"))
    return False, (rows, blocks), int(ahead) if ahead else None


def build(isa, cpu, n: int, k: int, bits: int, spec: str, threads: int):
    import tvm

    from llmc.compiler.codegen.tvm import intdot

    decode, tile, ahead = parse_tile(spec)
    kernel = intdot.intdot_linear_kernel(isa, n, k, 32, bits == 8, bits != 8, "float16", decode,
                                         ilv=intdot.weight_interleave(isa, n, bits), tile=tile, prefetch=ahead, bits=bits)
    target = tvm.target.Target(cpu.tvm_target(threads))
    return tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=target).jit()["main"]


def measure_shape(isa, cpu, n: int, k: int, bits: int, rows: int, specs: list[str], repeats: int,
                  threads: int) -> dict[str, float]:
    """Median microseconds per call of each variant at ``rows`` rows, interleaved call by call."""
    import numpy as np
    import tvm

    from llmc.compiler.codegen.tvm import intdot

    rng = np.random.default_rng(rows)
    lanes, ilv = isa.lanes, intdot.weight_interleave(isa, n, bits)
    copies = max(2, (48 << 20) // (n * k * bits // 8))  # > 48 MB a variant: past every cache
    kernels = {s: build(isa, cpu, n, k, bits, s, threads) for s in specs}
    q = tvm.runtime.tensor(rng.integers(-127, 127, (rows, k // 4), dtype=np.int32))
    d = tvm.runtime.tensor(rng.random((rows, k // 32), dtype=np.float32))
    ds = tvm.runtime.tensor(rng.random((rows, k // 32), dtype=np.float32))
    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    weights = {s: weight_copies(rng, n, k, lanes, ilv, bits, copies) for s in specs}
    times: dict[str, list[int]] = {s: [] for s in specs}
    for r in range(repeats + 5):
        for s in specs:
            w = weights[s][r % copies]
            t0 = time.perf_counter_ns()
            kernels[s](q, d, ds, *w, y)
            if r >= 5:
                times[s].append(time.perf_counter_ns() - t0)
    return {s: statistics.median(t) / 1e3 for s, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mcpu", default=None, help="LLVM CPU (default: this host's)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--tiles", nargs="+", default=["auto", "decode"])
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4: the 4-bit linears; 8: the LM head")
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from llmc.compiler.codegen.llvm_cpu import resolve_cpu
    from llmc.compiler.codegen.tvm import intdot

    cpu = resolve_cpu(args.mcpu)
    isa = intdot.int_dot_isa(cpu.arch, cpu.required_flags)
    if isa is None:
        print(f"{cpu.name}: no integer dot product; nothing to measure", file=sys.stderr)
        return 1
    shapes = [(n, k, count * LAYERS) for n, k, count in LAYER] if args.bits == 4 else [(*LM_HEAD, 1)]
    print(f"{cpu.name} ({isa.name}), {args.bits}-bit, {args.threads} thread(s), weights from DRAM, "
          f"microseconds per call (medians of {args.repeats}, variants interleaved)")
    results = []
    for rows in args.rows:
        totals = {s: 0.0 for s in args.tiles}
        for n, k, calls in shapes:
            per_call = measure_shape(isa, cpu, n, k, args.bits, rows, args.tiles, args.repeats, args.threads)
            for s in args.tiles:
                totals[s] += per_call[s] * calls / 1e3
            results.append({"rows": rows, "n": n, "k": k, "calls": calls, "us": per_call})
            print(f"  {rows} rows {n:>6} x {k:<5} " + "  ".join(f"{s} {v:.1f}" for s, v in per_call.items()), flush=True)
        results.append({"rows": rows, "step_ms": totals})
        print(f"{rows} rows, per step (ms): " + "  ".join(f"{s} {v:.2f}" for s, v in totals.items()), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"mcpu": cpu.name, "isa": isa.name, "bits": args.bits, "threads": args.threads,
                       "tiles": args.tiles, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
