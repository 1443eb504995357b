"""GPU kernels over the paged KV pools (metal target): ``kv_append`` and ``paged_attention``.

Same pools, layouts and calling convention as the cpu kernels of ``attention.py`` (keys
``[blocks, kv_heads, head_dim, block_size]``, values ``[blocks, block_size, kv_heads,
value_dim]``), written as hand-bound TIR for a GPU:

- ``kv_append``: one threadgroup per token, threads over (head, dim); a negative slot writes
  nothing.
- ``paged_attention``: one threadgroup per (tile of ``rows`` query rows of one sequence, KV
  head); threads per (query row, query head of that KV head's group), so the group's heads
  share every key and value load through the cache (GQA). A thread walks its sequence's
  block table from the first block its sliding window still sees to the block of its own
  position (nothing above the causal diagonal), scores a whole block into registers, and keeps
  an online softmax (running max, sum and output in registers, rescaled once per block).
  With one row per tile (decode) the row's blocks are dealt round-robin to ``lanes`` threads
  and a second phase merges their partial softmaxes from threadgroup memory. Softcap, sliding
  window and attention sinks are the cpu kernel's. Storage may be fp16; every load is widened
  and scores, sums and the output accumulate in fp32.

The only communication is between the two phases, which are two loops over the same threads
(TVM inserts the barrier), so ``gpu=False`` builds the very same per-thread bodies inside
serial loops, phase after phase, which LLVM runs on the CPU: that is how the numerics are
checked on a machine without a GPU.
"""

from __future__ import annotations

from tvm import tirx as tir
from tvm.script import tirx as T

from .attention import NEG, tile_locator
from .memo import memoized_kernel

KV_THREADS = 256  # threads per token of a kv_append


@memoized_kernel
def kv_append_kernel(kv_heads: int, dim: int, block_size: int, keys: bool, dtype: str = "float16",
                     gpu: bool = True):
    """In-place write of this step's keys or values into their slots: a threadgroup per token,
    threads over (head, dim). ``gpu=False``: the same body in serial loops (CPU checks)."""
    H, BS = kv_heads, block_size
    HD = H * dim
    TX = min(KV_THREADS, HD)
    OUTER = (HD + TX - 1) // TX

    @T.macro
    def write(x, slots, pool, nb, i, tx):
        for eo in range(T.int64(OUTER)):
            if eo * TX + tx < HD and slots[i] >= T.int64(0) and slots[i] < nb * BS:
                if keys:  # a Python constant: the parser keeps only the taken branch
                    pool[slots[i] // BS, (eo * TX + tx) // dim, (eo * TX + tx) % dim, slots[i] % BS] = \
                        x[i, (eo * TX + tx) // dim, (eo * TX + tx) % dim]
                else:
                    pool[slots[i] // BS, slots[i] % BS, (eo * TX + tx) // dim, (eo * TX + tx) % dim] = \
                        x[i, (eo * TX + tx) // dim, (eo * TX + tx) % dim]

    pool_shape = (lambda nb: (nb, H, dim, BS)) if keys else (lambda nb: (nb, BS, H, dim))

    if gpu:
        @T.prim_func(private=True, check_well_formed=False)
        def kv_append(var_x: T.handle, var_slots: T.handle, var_pool: T.handle):
            T.func_attr({"tirx.noalias": True, "llmc.kind": "kv_append"})
            t = T.int64()
            nb = T.int64()
            x = T.match_buffer(var_x, (t, H, dim), dtype)
            slots = T.match_buffer(var_slots, (t,), "int64")
            pool = T.match_buffer(var_pool, pool_shape(nb), dtype)
            for i in T.thread_binding(t, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(TX), thread="threadIdx.x"):
                    write(x, slots, pool, nb, i, tx)

        return kv_append

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append_serial(var_x: T.handle, var_slots: T.handle, var_pool: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "kv_append"})
        t = T.int64()
        nb = T.int64()
        x = T.match_buffer(var_x, (t, H, dim), dtype)
        slots = T.match_buffer(var_slots, (t,), "int64")
        pool = T.match_buffer(var_pool, pool_shape(nb), dtype)
        for i in range(t):
            for tx in range(T.int64(TX)):
                write(x, slots, pool, nb, i, tx)

    return kv_append_serial


def attention_rows(group: int, decode: bool) -> int:
    """Query rows per threadgroup: one for decode; else enough rows for ~64 threads."""
    if decode:
        return 1
    return max(1, min(32, 64 // group))


LANE_SHARED_BYTES = 16384  # threadgroup memory the lanes' partial results may take (Metal: 32 KiB)


def attention_lanes(rows: int, group: int, dv: int) -> int:
    """Threads that split one query row's keys (1 = no split): up to 16 for decode, as many as
    their partial results (max, sum, dv outputs each) fit in LANE_SHARED_BYTES."""
    if rows > 1:
        return 1
    lanes = 16
    while lanes > 1 and rows * group * lanes * (dv + 2) * 4 > LANE_SHARED_BYTES:
        lanes //= 2
    return lanes


@memoized_kernel
def paged_attention_kernel(hq: int, hkv: int, d: int, dv: int, block_size: int, scale: float, window: int,
                           softcap: float, rows: int, sinks: bool = False, dtype: str = "float16",
                           sink_dtype: str = "float32", out_dtype: str = None, gpu: bool = True,
                           lanes: int = None) -> tir.PrimFunc:
    """PrimFunc ``(q [T, hq, d], k_pool, v_pool, block_tables [B, MB], seq_lens [B],
    query_start [B + 1], [sinks [hq],] out [T, hq, dv])``; q, pools in ``dtype``, the output in
    ``out_dtype`` (default ``dtype``), fp32 arithmetic.

    ``lanes`` > 1 (default: :func:`attention_lanes`) splits each row's key blocks round-robin
    over that many threads, each with its own online softmax; their (max, sum, output) go to
    threadgroup memory and a second phase combines them, each lane writing every lanes-th
    output column. The phases are two loops over the same threads (TVM puts the barrier
    between them), so the serial variant (``gpu=False``) runs them one after the other with
    the same result."""
    G, BS, R = hq // hkv, block_size, rows
    L = lanes or attention_lanes(rows, G, dv)
    NT = R * G * L
    scale, softcap = float(scale), float(softcap)
    out_dtype = out_dtype or dtype
    f32, i64 = "float32", "int64"

    def allowed(j, p):
        if window > 0:
            return tir.all(j <= p, p - j < window)
        return j <= p

    def first_block(position):
        if window > 0:
            return tir.max(position - (window - 1), tir.const(0, i64)) // BS
        return tir.const(0, i64)

    def capped(s):
        if softcap > 0:
            return tir.const(softcap, f32) * tir.tanh(s * tir.const(scale / softcap, f32))
        return s * tir.const(scale, f32)

    def widen(e):
        return e.astype(f32) if dtype != f32 else e

    locate = tile_locator(R)  # which sequence owns this threadgroup's tile

    @T.macro
    def zero_unowned(starts, out, t, b, item, tid):
        if item == T.int64(0):  # rows no sequence owns (T beyond query_start[B]) are zero
            for z in range(((t - starts[b]) * hq * dv + NT - 1) // NT):
                if z * NT + tid < (t - starts[b]) * hq * dv:
                    out[starts[b] + (z * NT + tid) // (hq * dv), (z * NT + tid) // dv % hq,
                        (z * NT + tid) % dv] = T.Cast(out_dtype, T.float32(0))

    @T.macro
    def keys(q, kp, vp, tables, lens, starts, sk, b, item, tid, acc, stat, part_m, part_l, part_acc):
        # phase 1: this thread's share of its row's keys, online softmax in registers
        found = T.alloc_local((3,), i64)
        qv = T.alloc_local((d,), f32)
        s = T.alloc_local((BS,), f32)
        locate(found, item // hkv, starts, b)
        lane = tid % L
        g = tid // L % G
        r = tid // (L * G)
        hk = item % hkv
        h = hk * G + g
        for e in range(dv):
            acc[e] = T.float32(0)
        if sinks:  # a Python constant: the parser keeps only the taken branch
            stat[0] = T.if_then_else(lane == T.int64(0), T.Cast(f32, sk[h]), T.float32(NEG))
            stat[1] = T.if_then_else(lane == T.int64(0), T.float32(1), T.float32(0))
        else:
            stat[0] = T.float32(NEG)
            stat[1] = T.float32(0)
        if found[0] >= T.int64(0):
            seq = found[0]
            n = starts[seq + 1] - starts[seq]
            first_row = (item // hkv - found[1]) * R + r
            if first_row < n:
                row = starts[seq] + first_row
                p = lens[seq] - n + first_row
                for kd in range(d):
                    qv[kd] = widen(q[row, h, kd])
                for i in range((p // BS - first_block(p) - lane + L) // L):
                    kb = first_block(p) + lane + i * L
                    page = tables[seq, kb]
                    stat[2] = stat[0]
                    for jj in range(BS):
                        s[jj] = T.float32(0)
                        for kd in range(d):
                            s[jj] = s[jj] + qv[kd] * widen(kp[page, hk, kd, jj])
                        s[jj] = T.if_then_else(allowed(kb * BS + jj, p), capped(s[jj]), T.float32(NEG))
                        stat[2] = T.max(stat[2], s[jj])
                    stat[3] = T.float32(0)
                    for jj in range(BS):
                        s[jj] = T.if_then_else(s[jj] > T.float32(NEG), T.exp(s[jj] - stat[2]), T.float32(0))
                        stat[3] = stat[3] + s[jj]
                    rescale = T.exp(stat[0] - stat[2])
                    stat[1] = stat[1] * rescale + stat[3]
                    stat[0] = stat[2]
                    for e in range(dv):
                        acc[e] = acc[e] * rescale
                    for jj in range(BS):
                        for e in range(dv):
                            acc[e] = acc[e] + s[jj] * widen(vp[page, jj, hk, e])
        if L > 1:
            part_m[tid] = stat[0]
            part_l[tid] = stat[1]
            for e in range(dv):
                part_acc[tid, e] = acc[e]

    @T.macro
    def write_own(starts, out, b, item, tid, acc, stat):
        # L == 1: the thread's own result is the row's
        found = T.alloc_local((3,), i64)
        locate(found, item // hkv, starts, b)
        g = tid % G
        r = tid // G
        if found[0] >= T.int64(0):
            seq = found[0]
            n = starts[seq + 1] - starts[seq]
            first_row = (item // hkv - found[1]) * R + r
            if first_row < n:
                for e in range(dv):
                    out[starts[seq] + first_row, (item % hkv) * G + g, e] = T.Cast(out_dtype, acc[e] / stat[1])

    @T.macro
    def combine(starts, out, b, item, tid, part_m, part_l, part_acc):
        # phase 2: the lanes' partial softmaxes merged; lane writes columns lane, lane + L, ...
        found = T.alloc_local((3,), i64)
        tot = T.alloc_local((2,), f32)  # common max, common sum
        locate(found, item // hkv, starts, b)
        lane = tid % L
        g = tid // L % G
        r = tid // (L * G)
        base = tid - lane
        if found[0] >= T.int64(0):
            seq = found[0]
            n = starts[seq + 1] - starts[seq]
            first_row = (item // hkv - found[1]) * R + r
            if first_row < n:
                tot[0] = T.float32(NEG)
                for other in range(L):
                    tot[0] = T.max(tot[0], part_m[base + other])
                tot[1] = T.float32(0)
                for other in range(L):
                    tot[1] = tot[1] + part_l[base + other] * T.exp(part_m[base + other] - tot[0])
                for i in range((dv - lane + L - 1) // L):
                    e = lane + i * L
                    total = T.alloc_local((1,), f32)
                    total[0] = T.float32(0)
                    for other in range(L):
                        total[0] = total[0] + part_acc[base + other, e] * T.exp(part_m[base + other] - tot[0])
                    out[starts[seq] + first_row, (item % hkv) * G + g, e] = T.Cast(out_dtype, total[0] / tot[1])

    @T.macro
    def body(q, kp, vp, tables, lens, starts, out, sk, t, b):
        if gpu:  # a Python constant: the parser keeps only the taken branch
            for item in T.thread_binding(((t + R - 1) // R + b) * hkv, thread="blockIdx.x"):
                part_m = T.alloc_buffer((NT,), f32, scope="shared")
                part_l = T.alloc_buffer((NT,), f32, scope="shared")
                part_acc = T.alloc_buffer((NT, dv), f32, scope="shared")
                for tid in T.thread_binding(T.int64(NT), thread="threadIdx.x"):
                    acc = T.alloc_local((dv,), f32)
                    stat = T.alloc_local((4,), f32)  # running max, running sum, block max, block sum
                    zero_unowned(starts, out, t, b, item, tid)
                    keys(q, kp, vp, tables, lens, starts, sk, b, item, tid, acc, stat, part_m, part_l, part_acc)
                    if L == 1:
                        write_own(starts, out, b, item, tid, acc, stat)
                if L > 1:
                    for tid in T.thread_binding(T.int64(NT), thread="threadIdx.x"):
                        combine(starts, out, b, item, tid, part_m, part_l, part_acc)
        else:
            for item in range(((t + R - 1) // R + b) * hkv):
                part_m = T.alloc_buffer((NT,), f32)
                part_l = T.alloc_buffer((NT,), f32)
                part_acc = T.alloc_buffer((NT, dv), f32)
                for tid in range(T.int64(NT)):
                    acc = T.alloc_local((dv,), f32)
                    stat = T.alloc_local((4,), f32)
                    zero_unowned(starts, out, t, b, item, tid)
                    keys(q, kp, vp, tables, lens, starts, sk, b, item, tid, acc, stat, part_m, part_l, part_acc)
                    if L == 1:
                        write_own(starts, out, b, item, tid, acc, stat)
                if L > 1:
                    for tid in range(T.int64(NT)):
                        combine(starts, out, b, item, tid, part_m, part_l, part_acc)

    if sinks:
        @T.prim_func(private=True, check_well_formed=False)
        def paged_attention_sinks(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_tables: T.handle,
                                  var_lens: T.handle, var_starts: T.handle, var_sinks: T.handle,
                                  var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "llmc.kind": "paged_attention"})
            t = T.int64()
            nb = T.int64()
            b = T.int64()
            mb = T.int64()
            q = T.match_buffer(var_q, (t, hq, d), dtype)
            kp = T.match_buffer(var_k, (nb, hkv, d, BS), dtype)
            vp = T.match_buffer(var_v, (nb, BS, hkv, dv), dtype)
            tables = T.match_buffer(var_tables, (b, mb), i64)
            lens = T.match_buffer(var_lens, (b,), i64)
            starts = T.match_buffer(var_starts, (b + 1,), i64)
            sk = T.match_buffer(var_sinks, (hq,), sink_dtype)
            out = T.match_buffer(var_out, (t, hq, dv), out_dtype)
            body(q, kp, vp, tables, lens, starts, out, sk, t, b)

        return paged_attention_sinks

    @T.prim_func(private=True, check_well_formed=False)
    def paged_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_tables: T.handle,
                        var_lens: T.handle, var_starts: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "paged_attention"})
        t = T.int64()
        nb = T.int64()
        b = T.int64()
        mb = T.int64()
        q = T.match_buffer(var_q, (t, hq, d), dtype)
        kp = T.match_buffer(var_k, (nb, hkv, d, BS), dtype)
        vp = T.match_buffer(var_v, (nb, BS, hkv, dv), dtype)
        tables = T.match_buffer(var_tables, (b, mb), i64)
        lens = T.match_buffer(var_lens, (b,), i64)
        starts = T.match_buffer(var_starts, (b + 1,), i64)
        out = T.match_buffer(var_out, (t, hq, dv), out_dtype)
        body(q, kp, vp, tables, lens, starts, out, None, t, b)

    return paged_attention
