"""Time llmc's cpu paged-attention kernel alone (SmolLM2 shapes: 9 query heads, 3 KV heads, dim 64).

    python benchmarks/attention_kernel.py --tokens 512            # one sequence's prefill
    python benchmarks/attention_kernel.py --tokens 1 --seqs 8 --context 1024   # a decode batch
    python benchmarks/attention_kernel.py --tokens 1 --seqs 8 --context 1024 --kv-dtype float32 float16

With several ``--kv-dtype`` the pools of each dtype are timed alternately in one process (A B A
B ...), so load on a busy machine hits every side alike.

Each sequence's blocks are scattered over the pool, as the runtime's allocator leaves them.
The kernel is checked against the IR's meaning (the reference interpreter) before it is timed."""

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

from llmc.compiler.codegen.tvm.attention import paged_attention_kernel, tile_rows  # noqa: E402
from llmc.compiler.ir.interpreter import paged_attention_reference  # noqa: E402
from llmc.runtime.cpu_features import host_mcpu  # noqa: E402

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
    ap.add_argument("--kv-dtype", nargs="+", default=["float32"], choices=("float32", "float16"),
                    help="pool dtype(s); float16 pools are float32 ones rounded (the reference reads those)")
    args = ap.parse_args()
    bs, n, ctx = args.block_size, args.tokens, args.context + args.tokens
    rows = args.rows or tile_rows(H // HKV, bs, 16, 32)
    per_seq = -(-ctx // bs)
    nb = per_seq * args.seqs
    rng = np.random.default_rng(0)
    k_pool = rng.standard_normal((nb, bs, HKV, D), dtype=np.float32)
    v_pool = rng.standard_normal((nb, bs, HKV, D), dtype=np.float32)
    tables = rng.permutation(nb).reshape(args.seqs, per_seq).astype(np.int64)
    q = rng.standard_normal((n * args.seqs, H, D), dtype=np.float32)
    lens = np.full(args.seqs, ctx, np.int64)
    starts = np.arange(args.seqs + 1, dtype=np.int64) * n
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": args.threads})
    sides = []
    for dtype in args.kv_dtype:
        kp, vp = k_pool.astype(dtype), v_pool.astype(dtype)
        want = paged_attention_reference(*(torch.from_numpy(a) for a in (q, kp.astype(np.float32), vp.astype(np.float32),
                                                                          tables, lens, starts)), SCALE, 0, 0.0).numpy()
        func = paged_attention_kernel(H, HKV, D, D, bs, SCALE, 0, 0.0, rows, args.threads, kv_dtype=dtype)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
        out = tvm.runtime.empty(q.shape, "float32")
        call = [tvm.runtime.tensor(a) for a in (q, np.ascontiguousarray(kp.transpose(0, 2, 3, 1)), vp, tables,
                                                lens, starts)] + [out]
        lib["main"](*call)
        sides.append((dtype, lib["main"], call, float(np.abs(out.numpy() - want).max()), []))
    for _ in range(args.repeats):
        for _, fn, call, _, times in sides:
            t0 = time.perf_counter()
            fn(*call)
            times.append(time.perf_counter() - t0)
    for dtype, _, _, err, times in sides:
        print(f"paged attention, {args.seqs} x {n} queries over {ctx} positions (block {bs}, {rows} rows per tile, "
              f"{dtype} KV): {np.median(times) * 1e3:7.3f} ms per layer (median of {args.repeats}; max abs error "
              f"{err:.1e})")


if __name__ == "__main__":
    main()
