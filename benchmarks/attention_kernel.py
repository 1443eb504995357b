"""Time llmc's cpu paged-attention kernel alone (SmolLM2 shapes: 9 query heads, 3 KV heads, dim 64).

    python benchmarks/attention_kernel.py --tokens 512            # one sequence's prefill
    python benchmarks/attention_kernel.py --tokens 1 --seqs 8 --context 1024   # a decode batch
    python benchmarks/attention_kernel.py --tokens 1 --seqs 8 --context 1024 --kv-dtype float32 float16
    python benchmarks/attention_kernel.py --tokens 1 --seqs 8 --context 256 --kv-dtype float16 int8 --cold 40

With several ``--kv-dtype`` the pools of each dtype are timed alternately in one process (A B A
B ...), so load on a busy machine hits every side alike.

Each sequence's blocks are scattered over the pool, as the runtime's allocator leaves them.
``--cold N`` times each dtype over N batches of its own (different blocks of one N times larger
pool, taken in turn), so a call reads what no call just read: a served decode batch's pools
come from DRAM.
The kernel is checked against the IR's meaning (the reference interpreter) before it is timed."""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

from llmc.compiler.codegen.tvm.attention import (  # noqa: E402
    from_int8_layouts, paged_attention_kernel, tile_rows, to_int8_layouts)
from llmc.compiler.ir.interpreter import paged_attention_reference  # noqa: E402
from llmc.runtime.cpu_features import host_mcpu  # noqa: E402
from llmc.runtime.threads import configure_threads  # noqa: E402

H, HKV, D, SCALE = 9, 3, 64, 0.125


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="new tokens per sequence in the step")
    ap.add_argument("--context", type=int, default=0, help="tokens each sequence had cached before the step")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--rows", type=int, default=0, help="query rows per tile (default: from the register budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--kv-dtype", nargs="+", default=["float32"], choices=("float32", "float16", "int8"),
                    help="pool dtype(s); float16 / int8 pools hold float32 ones rounded / quantized (the reference "
                         "reads what they hold)")
    ap.add_argument("--cold", type=int, default=1, metavar="N",
                    help="batches per dtype over distinct blocks, called in turn (default 1: the pool stays cached)")
    args = ap.parse_args()
    configure_threads(args.threads)  # TVM's pool would otherwise take half the cores (runtime/threads.py)
    bs, n, ctx = args.block_size, args.tokens, args.context + args.tokens
    rows = args.rows or tile_rows(H // HKV, bs, 16, 32)
    per_seq = -(-ctx // bs)
    nb = per_seq * args.seqs * args.cold
    rng = np.random.default_rng(0)
    k_pool = rng.standard_normal((nb, bs, HKV, D), dtype=np.float32)
    v_pool = rng.standard_normal((nb, bs, HKV, D), dtype=np.float32)
    tables = rng.permutation(nb).reshape(args.cold, args.seqs, per_seq).astype(np.int64)
    q = rng.standard_normal((n * args.seqs, H, D), dtype=np.float32)
    lens = np.full(args.seqs, ctx, np.int64)
    starts = np.arange(args.seqs + 1, dtype=np.int64) * n
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": args.threads})
    sides = []
    for dtype in args.kv_dtype:
        if dtype == "int8":
            kp, vp = to_int8_layouts(k_pool, v_pool)
            held_k, held_v = from_int8_layouts(kp, vp)
        else:
            held_k, held_v = k_pool.astype(dtype).astype(np.float32), v_pool.astype(dtype).astype(np.float32)
            kp, vp = np.ascontiguousarray(k_pool.astype(dtype).transpose(0, 2, 3, 1)), v_pool.astype(dtype)
        want = paged_attention_reference(*(torch.from_numpy(a) for a in (q, held_k, held_v, tables[0], lens, starts)),
                                         SCALE, 0, 0.0).numpy()
        func = paged_attention_kernel(H, HKV, D, D, bs, SCALE, 0, 0.0, rows, args.threads, kv_dtype=dtype)
        fn = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()["main"]
        pools = [tvm.runtime.tensor(kp), tvm.runtime.tensor(vp)]
        calls = [[tvm.runtime.tensor(q), *pools, *(tvm.runtime.tensor(a) for a in (tables[c], lens, starts)),
                  tvm.runtime.empty(q.shape, "float32")] for c in range(args.cold)]
        fn(*calls[0])
        sides.append((dtype, fn, calls, float(np.abs(calls[0][-1].numpy() - want).max()), []))
    for _ in range(args.repeats):  # each repeat: every batch of each side back to back (the pool's threads stay awake)
        for _, fn, calls, _, times in sides:
            t0 = time.perf_counter()
            for call in calls:
                fn(*call)
            times.append((time.perf_counter() - t0) / len(calls))
    for dtype, _, _, err, times in sides:
        print(f"paged attention, {args.seqs} x {n} queries over {ctx} positions (block {bs}, {rows} rows per tile, "
              f"{dtype} KV{', cold' if args.cold > 1 else ''}): {np.median(times) * 1e3:7.3f} ms per layer (median "
              f"of {args.repeats}; max abs error {err:.1e})")


if __name__ == "__main__":
    main()
