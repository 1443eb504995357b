"""Attention kernels of the cpu target over paged KV pools: ``kv_append`` (this step's keys and
values into their slots) and ``paged_attention`` (every sequence of a batch over its blocks).

Pool layouts (the manifest records them): keys ``[blocks, kv_heads, head_dim, block_size]``,
transposed inside each block so scores vectorize over the block's key positions; values
``[blocks, block_size, kv_heads, value_dim]``, so P·V vectorizes over the value dim.

``paged_attention`` is one hand-written TIR loop nest in the flash-attention style, for
prefill chunks, decode tokens and mixed batches alike. A parallel work item is a tile of up
to ``rows`` consecutive query rows of ONE sequence times one KV head (all query heads of
that KV head's group share every key load). The item walks the sequence's key blocks through
its block table, from the first block a sliding window still sees to the block of the tile's
last position (nothing above the causal diagonal is touched), keeps a running max, sum and
output per row (online softmax, no [T, H, S] scores), and uses a vectorized polynomial exp
(``fast_exp``) instead of one libm call per lane. A tile with fewer valid rows than
``rows`` (a decode token, the end of a chunk) runs a one-row body per valid row, so decode
tokens in a batch cost no wasted work.

Pools may be float16 (``--kv-dtype``): ``kv_append`` rounds to nearest on the store and
``paged_attention`` widens each loaded key / value vector to float32 in registers (F16C
``vcvtph2ps`` on x86-64-v3 and up, ``fcvtl`` on AArch64), so every product, max, exp and sum
stays float32 and only the pool's memory traffic halves.

Pools may also be int8 (``--kv-dtype int8``, a quarter of float32's bytes): each position's
key or value vector of one head is stored as round(x * 127 / max|x|) with its float32 scale
max|x| / 127 beside it, in ``SCALE_BYTES`` extra int8 entries of the pool (keys
``[blocks, kv_heads, head_dim + 4, block_size]``: four byte rows after the head_dim rows hold
the block's per-position scales; values ``[blocks, block_size, kv_heads, value_dim + 4]``).
The kernels read those bytes through a float32 view of the same memory. Attention widens the
codes to float32 like float16 ones and applies the scales once per score (keys) and once per
probability (values), so the arithmetic stays float32. A decode batch reads its pools from
DRAM (they outgrow the L3), which is where the halved traffic pays.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx as tir
from tvm.script import tirx as T

from .memo import memoized_kernel

SCALE_BYTES = 4  # int8 pools: one float32 scale per position and head, stored in the pool itself
NEG = -3.0e38  # "minus infinity" that stays finite, so exp(NEG - NEG) is never NaN


def fast_exp(x):
    """e^x for float32 x <= 0, as a TIR expression that vectorizes (relative error < 1e-7).

    Range reduction x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for accuracy), a
    degree-7 polynomial for e^r, and 2^n built in the exponent bits. Inputs below -87 are
    clamped (their result, ~1e-38, is zero for softmax purposes)."""
    f32 = "float32"
    x = tir.max(x, tir.const(-87.0, f32))
    n = tir.floor(x * tir.const(1.4426950408889634, f32) + tir.const(0.5, f32))
    r = x - n * tir.const(0.693359375, f32) - n * tir.const(-2.12194440e-4, f32)
    p = tir.const(1.9875691500e-4, f32)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + tir.const(c, f32)
    p = p * r * r + r + tir.const(1.0, f32)
    bits = tir.shift_left(tir.Cast("int32", n) + tir.const(127, "int32"), tir.const(23, "int32"))
    return p * tir.reinterpret(f32, bits)


def prefetch_to_l2(address):
    """A read prefetch of the cache line at ``address`` into L2 and up (``prefetcht1`` on x86:
    locality 2), as a TIR statement: the kernels that stream from DRAM ask for what they will
    read next (the paged KV blocks here, the batched integer linears' weights in intdot.py)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 2, 1))


def tile_rows(group: int, block_size: int, lanes: int, registers: int) -> int:
    """Query rows per tile: as many as keep rows x group x (block_size / lanes) score vectors
    within three quarters of the vector registers (the rest hold keys and the query scalar)."""
    vectors_per_row = group * max(1, block_size // lanes)
    return max(1, min(4, (registers * 3 // 4) // vectors_per_row))


def pool_extent(dim: int, dtype: str) -> int:
    """Entries a pool keeps per head_dim (keys' rows) or value_dim (values' columns): int8 pools
    keep each position's scale in ``SCALE_BYTES`` more. Their float32 view needs dim % 4 == 0."""
    if dtype != "int8":
        return dim
    if dim % SCALE_BYTES:
        raise ValueError(f"int8 KV pools need head dims that are multiples of {SCALE_BYTES}, got {dim}; "
                         f"compile with --kv-dtype float16 instead")
    return dim + SCALE_BYTES


def key_scale_index(block, head, position, heads: int, dim: int, block_size: int):
    """Where an int8 key pool's float32 view holds the scale of (block, head, position): the
    ``SCALE_BYTES`` byte rows after the head's ``dim`` rows, one float per position."""
    return ((block * heads + head) * (dim + SCALE_BYTES) + dim) * block_size // SCALE_BYTES + position


def value_scale_index(block, position, head, heads: int, dim: int, block_size: int):
    """Where an int8 value pool's float32 view holds the scale of (block, position, head): the
    float after that position's ``dim`` codes of the head."""
    return (((block * block_size + position) * heads + head) * (dim + SCALE_BYTES) + dim) // SCALE_BYTES


def _conversion(source: str, dtype: str):
    """``x -> x`` as ``dtype`` for an ``x`` of ``source``: no Cast node when they agree (float32
    pools keep today's kernels)."""
    if source == dtype:
        return lambda x: x
    return lambda x: tir.Cast(dtype, x)


@memoized_kernel
def kv_append_kernel(kv_heads: int, dim: int, block_size: int, keys: bool, dtype: str = "float32",
                     pool_dtype: str = ""):
    """In-place write of this step's keys (pool [NB, Hkv, D, BS]) or values (pool [NB, BS, Hkv, Dv])
    into their slots; a slot outside the pool (negative: a padding token) writes nothing.
    ``dtype``: the incoming keys / values; ``pool_dtype`` (default ``dtype``): the pool's, the
    store rounding to nearest when it is narrower; int8 pools get codes and scales (see the
    module docstring)."""
    H, BS = kv_heads, block_size
    pool_dtype = pool_dtype or dtype
    if pool_dtype == "int8":
        return _kv_append_int8(kv_heads, dim, block_size, keys, dtype)
    stored = _conversion(dtype, pool_dtype)

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append(var_x: T.handle, var_slots: T.handle, var_pool: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "kv_append"})
        t = T.int64()
        nb = T.int64()
        x = T.match_buffer(var_x, (t, H, dim), dtype)
        slots = T.match_buffer(var_slots, (t,), "int64")
        if keys:  # a Python constant: the parser keeps only the taken branch
            pool = T.match_buffer(var_pool, (nb, H, dim, BS), pool_dtype)
            for i in range(t):
                if slots[i] >= T.int64(0) and slots[i] < nb * BS:
                    for h, d in T.grid(H, dim):
                        pool[slots[i] // BS, h, d, slots[i] % BS] = stored(x[i, h, d])
        else:
            pool = T.match_buffer(var_pool, (nb, BS, H, dim), pool_dtype)
            for i in range(t):
                if slots[i] >= T.int64(0) and slots[i] < nb * BS:
                    for h in range(H):
                        for d in T.vectorized(dim):
                            pool[slots[i] // BS, slots[i] % BS, h, d] = stored(x[i, h, d])

    return kv_append


def _kv_append_int8(kv_heads: int, dim: int, block_size: int, keys: bool, dtype: str):
    """kv_append into an int8 pool: per (token, head) the scale max|x| / 127 and the codes
    round(x * 127 / max|x|) (all zero for an all-zero vector)."""
    H, BS, E = kv_heads, block_size, pool_extent(dim, "int8")
    f32 = "float32"
    shape = (lambda nb: (nb, H, E, BS)) if keys else (lambda nb: (nb, BS, H, E))
    # where entry d of head h at slot s goes, and (in the pool's float32 view) its vector's scale
    if keys:
        def entry(s, h, d):
            return (s // BS, h, d, s % BS)

        def scale_index(s, h):
            return key_scale_index(s // BS, h, s % BS, H, dim, BS)
    else:
        def entry(s, h, d):
            return (s // BS, s % BS, h, d)

        def scale_index(s, h):
            return value_scale_index(s // BS, s % BS, h, H, dim, BS)
    lanes = T.serial if keys else T.vectorized  # keys' codes of one position are a block apart
    # max |x| in W vector lanes, then across them, not as a serial chain of ``dim`` dependent
    # maxes (8 tokens, pools cold: values 4.20 -> 3.62 us a call, keys 8.62 -> 8.34: their
    # stores, 34 lines a token and head, dominate)
    W = math.gcd(dim, 16)

    def code(x, inverse):  # round to nearest, within [-127, 127] (float rounding can reach 127.00001)
        v = tir.round(tir.Cast(f32, x) * inverse)
        return tir.Cast("int8", tir.max(tir.min(v, tir.const(127.0, f32)), tir.const(-127.0, f32)))

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append(var_x: T.handle, var_slots: T.handle, var_pool: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "kv_append"})
        t = T.int64()
        nb = T.int64()
        x = T.match_buffer(var_x, (t, H, dim), dtype)
        slots = T.match_buffer(var_slots, (t,), "int64")
        pool = T.match_buffer(var_pool, shape(nb), "int8")
        amax = T.alloc_buffer((1,), f32, scope="global")
        part = T.alloc_buffer((W,), f32, scope="global")  # W lanes of running |x| maxima
        scales = T.decl_buffer((nb * H * E * BS // SCALE_BYTES,), f32, data=pool.data)  # the pool as float32
        for i in range(t):
            if slots[i] >= T.int64(0) and slots[i] < nb * BS:
                for h in range(H):
                    for w in T.vectorized(W):
                        part[w] = T.abs(T.Cast(f32, x[i, h, w]))
                    for c in range(1, dim // W):
                        for w in T.vectorized(W):
                            part[w] = T.max(part[w], T.abs(T.Cast(f32, x[i, h, c * W + w])))
                    amax[0] = T.float32(0)
                    for w in range(W):
                        amax[0] = T.max(amax[0], part[w])
                    inverse: T.let[T.float32] = T.if_then_else(amax[0] > T.float32(0),
                                                               T.float32(127) / amax[0], T.float32(0))
                    for d in lanes(dim):
                        pool[entry(slots[i], h, d)] = code(x[i, h, d], inverse)
                    scales[scale_index(slots[i], h)] = amax[0] / T.float32(127)

    return kv_append


def tile_locator(rows: int):
    """A TVMScript macro ``locate(found, tile_index, starts, b)``: which sequence owns tile
    ``tile_index`` when each sequence's rows (``starts``, B + 1 offsets) are cut into tiles of
    ``rows``. Sets ``found`` (3 int64) to (that sequence, its first tile, tiles counted), or
    found[0] = -1 when no sequence does. Shared by the cpu and gpu attention kernels."""
    R = rows

    @T.macro
    def locate(found, tile_index, starts, b):
        found[0] = T.int64(-1)
        found[2] = T.int64(0)
        for sq in range(b):
            if found[0] < T.int64(0):
                n_tiles: T.let[T.int64] = (starts[sq + 1] - starts[sq] + R - 1) // R
                if tile_index < found[2] + n_tiles:
                    found[0] = sq
                    found[1] = found[2]
                found[2] = found[2] + n_tiles

    return locate


@memoized_kernel
def paged_attention_kernel(hq: int, hkv: int, d: int, dv: int, block_size: int, scale: float, window: int,
                           softcap: float, rows: int, threads: int, sinks: bool = False, lanes: int = 16,
                           registers: int = 32, chunk: int = 0, alibi=None,
                           kv_dtype: str = "float32", prefetch: int = 1, prefetch_next_item: bool = True) -> tir.PrimFunc:
    """PrimFunc ``(q [T, hq, d], k_pool, v_pool, block_tables [B, MB], seq_lens [B],
    query_start [B + 1], [sinks [hq],] out [T, hq, dv])`` for ``kv_dtype`` pools (float32,
    float16 or int8 with per-position scales, widened to float32 on load) of ``block_size``
    positions per block, with tiles of
    ``rows`` query rows; ``threads`` is the parallel width
    the work items are interleaved for (each thread gets an even share of early and late
    tiles). With ``sinks``, each row's online softmax starts from its head's sink logit
    (running max = sink, running sum = 1) instead of from nothing. With ``chunk`` > 0 a query
    at p sees only keys j >= (p // chunk) * chunk (its own chunk; chunked attention). With
    ``alibi`` (one slope per query head) each logit gains slope_h * (j - p).

    ``prefetch``: while a tile works on one key block it asks the cache for the keys and values
    of the block ``prefetch`` blocks ahead (``llvm.prefetch`` into L2 and up; 0: none; 2 and 3
    measured no better than 1 on a served step's real pools). Blocks are scattered over the pool, so the
    hardware prefetchers restart at every block, and a decode batch reads its KV once, from
    DRAM (a step's pools outgrow the L3). Pool cold, 2 threads, f16 KV: 8 sequences x 256
    positions 131-162 -> 98-108 us a layer, 8 of 97-362 positions 72-84 -> 60-69 us, one of 1024
    80-87 -> 65-68 us; cache-resident +4-6%. In a served 8-sequence step the kernel still takes
    ~2x its cache-resident time (2.4-2.7 ms for 30 layers against 1.2 ms).

    ``prefetch_next_item`` (with ``prefetch`` > 0): each work item also sends the first block
    of the next item of its lane toward the cache before it computes, so a decode item (a few
    blocks long) no longer starts by waiting on DRAM. Pools cold, 8 sequences, 2 threads, A/B
    in one process (benchmarks/attention_kernel.py --cold 30): 231 positions float16 0.169 ->
    0.150 and 0.123 -> 0.115 ms a layer, int8 0.115 -> 0.107 and 0.074 -> 0.073; 101 positions
    float16 0.081 -> 0.073, int8 0.055 -> 0.049; 601 positions -2%; cache-resident, one
    sequence's decode and a 512-token prefill unchanged (within 2%)."""
    G, BS, R = hq // hkv, block_size, rows
    scale, softcap = float(scale), float(softcap)
    i64 = "int64"

    LW = math.gcd(BS, lanes)  # lanes of the running softmax denominators
    LANES = 4 * threads  # parallel iterations (more than threads: a pool larger than planned still fills)
    AHEAD = int(prefetch)  # blocks ahead (True: 1)
    NEXT_ITEM = AHEAD > 0 and prefetch_next_item
    ELEM = {"float16": 2, "int8": 1}.get(kv_dtype, 4)
    LINE = 64 // ELEM  # pool entries per 64-byte cache line
    if kv_dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"the cpu attention kernel reads float32, float16 or int8 KV pools, not {kv_dtype}")
    KE, VE = pool_extent(d, kv_dtype), pool_extent(dv, kv_dtype)  # a pool's key rows / value columns
    SCALED = kv_dtype == "int8"
    K_LINES = (KE * BS * ELEM + 63) // 64
    V_LINES = (VE * ELEM + 63) // 64
    TREE = BS >= 2 and BS & (BS - 1) == 0 and BS <= 512  # power of two: the block max as a halving tree

    def pv_columns(nr):  # P.V output columns per pass: nr x G x chunk / lanes accumulators fit the registers
        if dv % lanes:
            return dv
        k = max(1, min(dv // lanes, (registers * 3 // 4) // (nr * G)))
        while dv % (k * lanes):
            k -= 1
        return k * lanes

    def allowed(j, p):  # key position j visible to a query at position p (float-free, no ==)
        conds = [j <= p]
        if window > 0:
            conds.append(p - j < window)
        if chunk > 0:  # same chunk as the query (given j <= p)
            conds.append(j >= tir.floordiv(p, chunk) * chunk)
        return tir.all(*conds) if len(conds) > 1 else conds[0]

    def first_block(lowest_position):  # the first key block a sliding window / chunk still sees
        first = tir.const(0, i64)
        if window > 0:
            first = tir.max(lowest_position - (window - 1), first)
        if chunk > 0:
            first = tir.max(tir.floordiv(lowest_position, chunk) * chunk, first)
        return first // BS

    def tile_position(lens, starts, seq, first_row):  # the position of a tile's first query row
        return lens[seq] - (starts[seq + 1] - starts[seq]) + first_row

    def capped(s):
        if softcap > 0:
            return tir.const(softcap, "float32") * tir.tanh(s * tir.const(scale / softcap, "float32"))
        return s * tir.const(scale, "float32")

    slopes = [float(x) for x in (alibi or [])]

    widen = _conversion(kv_dtype, "float32")  # a loaded key / value as float32 (vectorized with its loop)

    def biased(x, head, distance):  # ALiBi: slope_h * (j - p), the slope picked by a select chain
        if not slopes:
            return x
        head = tir.Cast("int64", head)
        slope = tir.const(slopes[-1], "float32")
        for h in reversed(range(len(slopes) - 1)):
            slope = tir.Select(head == tir.const(h, "int64"), tir.const(slopes[h], "float32"), slope)
        return x + slope * tir.Cast("float32", distance)

    def key_scaled(x, kf, page, hk, jj):  # an int8 pool's score times its key's scale
        if not SCALED:
            return x
        return x * kf[key_scale_index(page, hk, jj, hkv, d, BS)]

    @T.macro
    def fetch_block(kp, vp, page, hk):  # one KV head's keys and values of a block toward the cache
        for x in range(K_LINES):
            prefetch_to_l2(T.address_of(kp[page, hk, x * LINE // BS, x * LINE % BS]))
        for jj in range(BS):
            for x in T.unroll(V_LINES):
                prefetch_to_l2(T.address_of(vp[page, jj, hk, x * LINE]))

    locate = tile_locator(R)

    @T.macro
    def tile(q, kp, vp, kf, vf, tables, out, seq, row, p0, hk, nr, sk):
        # nr query rows from T row `row` on, at positions p0 .. p0 + nr - 1, of sequence `seq`
        s = T.alloc_local((nr, G, BS), "float32")
        p = T.alloc_local((nr, G, BS), "float32")
        acc = T.alloc_local((nr, G, dv), "float32")
        m = T.alloc_buffer((nr, G), "float32", scope="global")
        lv = T.alloc_local((nr, G, LW), "float32")  # per-lane partial sums of the softmax denominator
        red = T.alloc_buffer((BS,), "float32", scope="global")
        vs = T.alloc_buffer((BS if SCALED else 1,), "float32", scope="global")  # int8: the block's value scales
        for r, g in T.grid(nr, G):
            for x in T.vectorized(LW):
                lv[r, g, x] = T.float32(0)
            if sinks:  # a Python constant: the parser keeps only the taken branch
                m[r, g] = sk[hk * G + g]
                lv[r, g, 0] = T.float32(1)
            else:
                m[r, g] = T.float32(NEG)
            for e in T.vectorized(dv):
                acc[r, g, e] = T.float32(0)
        for kb in range(first_block(p0), (p0 + nr - 1) // BS + 1):
            page: T.let[T.int64] = tables[seq, kb]
            for ahead in T.unroll(1, AHEAD + 1):  # AHEAD = 0: no loop at all
                # block kb + AHEAD toward the cache; the first block also sends the ones before it
                if (ahead == AHEAD or kb == first_block(p0)) and kb + ahead <= (p0 + nr - 1) // BS:
                    fetch_block(kp, vp, tables[seq, kb + ahead], hk)
            for r, g in T.grid(nr, G):
                for jj in T.vectorized(BS):
                    s[r, g, jj] = T.float32(0)
            for kd in range(d):
                for r in T.unroll(nr):
                    for g in T.unroll(G):
                        for jj in T.vectorized(BS):
                            s[r, g, jj] = s[r, g, jj] + q[row + r, hk * G + g, kd] * widen(kp[page, hk, kd, jj])
            if SCALED:  # a Python constant: the parser keeps only the taken branch
                for jj in range(BS):
                    vs[jj] = vf[value_scale_index(page, jj, hk, hkv, dv, BS)]
            for r, g in T.grid(nr, G):
                for jj in T.vectorized(BS):
                    s[r, g, jj] = T.if_then_else(allowed(kb * BS + jj, p0 + r),
                                                 biased(capped(key_scaled(s[r, g, jj], kf, page, hk, jj)),
                                                        hk * G + g, kb * BS + jj - (p0 + r)),
                                                 T.float32(NEG))
                # the block's max as a tree of halving vector maxes (no serial chain of BS scalar maxes)
                if TREE:  # a Python constant: the parser keeps only the taken branch
                    for jj in T.vectorized(BS // 2):
                        red[jj] = T.max(s[r, g, jj], s[r, g, jj + BS // 2])
                    if BS >= 4:
                        for jj in T.vectorized(BS >> 2):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 2)])
                    if BS >= 8:
                        for jj in T.vectorized(BS >> 3):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 3)])
                    if BS >= 16:
                        for jj in T.vectorized(BS >> 4):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 4)])
                    if BS >= 32:
                        for jj in T.vectorized(BS >> 5):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 5)])
                    if BS >= 64:
                        for jj in T.vectorized(BS >> 6):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 6)])
                    if BS >= 128:
                        for jj in T.vectorized(BS >> 7):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 7)])
                    if BS >= 256:
                        for jj in T.vectorized(BS >> 8):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 8)])
                    if BS >= 512:
                        for jj in T.vectorized(BS >> 9):
                            red[jj] = T.max(red[jj], red[jj + (BS >> 9)])
                else:
                    red[0] = s[r, g, 0]
                    for jj in range(BS - 1):
                        red[0] = T.max(red[0], s[r, g, jj + 1])
                top: T.let[T.float32] = T.max(m[r, g], red[0])
                for jj in T.vectorized(BS):
                    p[r, g, jj] = T.if_then_else(s[r, g, jj] > T.float32(NEG), fast_exp(s[r, g, jj] - top),
                                                 T.float32(0))
                rescale: T.let[T.float32] = fast_exp(m[r, g] - top)
                m[r, g] = top
                for x in T.vectorized(LW):  # lane sums: reduced once per tile, not per block
                    lv[r, g, x] = lv[r, g, x] * rescale + p[r, g, x]
                for c in T.unroll(BS // LW - 1):
                    for x in T.vectorized(LW):
                        lv[r, g, x] = lv[r, g, x] + p[r, g, (c + 1) * LW + x]
                for e in T.vectorized(dv):
                    acc[r, g, e] = acc[r, g, e] * rescale
                if SCALED:  # the denominator took the plain probabilities; P.V takes them times the value scales
                    for jj in T.vectorized(BS):
                        p[r, g, jj] = p[r, g, jj] * vs[jj]
            # P.V register-tiled: EW output columns of every row stay in registers over the block's keys
            for ec in T.unroll(dv // pv_columns(nr)):
                for jj in range(BS):
                    for r in T.unroll(nr):
                        for g in T.unroll(G):
                            for e in T.vectorized(pv_columns(nr)):
                                acc[r, g, ec * pv_columns(nr) + e] = (acc[r, g, ec * pv_columns(nr) + e]
                                                                  + p[r, g, jj] * widen(vp[page, jj, hk, ec * pv_columns(nr) + e]))
        for r, g in T.grid(nr, G):
            total = T.alloc_buffer((1,), "float32", scope="global")
            total[0] = T.float32(0)
            for x in range(LW):
                total[0] = total[0] + lv[r, g, x]
            for e in T.vectorized(dv):
                out[row + r, hk * G + g, e] = acc[r, g, e] / total[0]

    @T.macro
    def run(q, kp, vp, kf, vf, tables, lens, starts, out, sk, t, b):
        for i, h, e in T.grid(t - starts[b], hq, dv):  # rows no sequence owns
            out[starts[b] + i, h, e] = T.float32(0)
        # Each sequence's rows split into tiles of R; (t + R - 1) // R + b bounds their count.
        items: T.let[T.int64] = ((t + R - 1) // R + b) * hkv
        # One parallel iteration per lane, each walking its share of the items in a serial loop,
        # so the tiles' scratch arrays (merged into one workspace allocation by TVM when they
        # outgrow the stack) are allocated once per lane, not once per item (that allocation was
        # ~20% of a decode batch's attention time). Lane k takes items k, k + LANES, ...: an even
        # share of early (cheap) and late (dear) tiles.
        # The pool hands each thread a contiguous run of lanes; lane -> slot deals consecutive
        # items to different threads, so a lone decode token's few (KV head) items are shared
        # by the threads instead of all landing on the first one.
        for lane in T.parallel(LANES):
            for k in range((items + LANES - 1) // LANES):
                found = T.alloc_buffer((3,), "int64", scope="global")  # sequence, first tile of that sequence, tiles so far
                idx: T.let[T.int64] = k * LANES + lane % (LANES // threads) * threads + lane // (LANES // threads)
                hk: T.let[T.int64] = idx % hkv
                tile_index: T.let[T.int64] = idx // hkv
                found[0] = T.int64(-1)
                if idx < items:
                    locate(found, tile_index, starts, b)
                if NEXT_ITEM:  # a Python constant: the parser keeps only the taken branch
                    # this lane's next item: its first key block toward the cache while this item
                    # computes (a decode item is a few blocks long, so its first block's wait was
                    # a large part of its time with the pools in DRAM)
                    ahead_item = T.alloc_buffer((3,), "int64", scope="global")
                    a_idx: T.let[T.int64] = idx + LANES
                    if a_idx < items:
                        locate(ahead_item, a_idx // hkv, starts, b)
                        if ahead_item[0] >= T.int64(0):
                            a_p0: T.let[T.int64] = tile_position(lens, starts, ahead_item[0],
                                                                 (a_idx // hkv - ahead_item[1]) * R)
                            fetch_block(kp, vp, tables[ahead_item[0], first_block(a_p0)], a_idx % hkv)
                if found[0] >= T.int64(0):
                    seq: T.let[T.int64] = found[0]
                    n: T.let[T.int64] = starts[seq + 1] - starts[seq]
                    first_row: T.let[T.int64] = (tile_index - found[1]) * R
                    row: T.let[T.int64] = starts[seq] + first_row
                    p0: T.let[T.int64] = tile_position(lens, starts, seq, first_row)
                    if first_row + R <= n:
                        tile(q, kp, vp, kf, vf, tables, out, seq, row, p0, hk, R, sk)
                    else:
                        for r0 in range(n - first_row):
                            tile(q, kp, vp, kf, vf, tables, out, seq, row + r0, p0 + r0, hk, 1, sk)

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
            q = T.match_buffer(var_q, (t, hq, d), "float32")
            kp = T.match_buffer(var_k, (nb, hkv, KE, BS), kv_dtype)
            vp = T.match_buffer(var_v, (nb, BS, hkv, VE), kv_dtype)
            tables = T.match_buffer(var_tables, (b, mb), "int64")
            lens = T.match_buffer(var_lens, (b,), "int64")
            starts = T.match_buffer(var_starts, (b + 1,), "int64")
            sk = T.match_buffer(var_sinks, (hq,), "float32")
            out = T.match_buffer(var_out, (t, hq, dv), "float32")
            kf = T.decl_buffer((nb * hkv * KE * BS * ELEM // 4,), "float32", data=kp.data)  # (int8: the scales)
            vf = T.decl_buffer((nb * BS * hkv * VE * ELEM // 4,), "float32", data=vp.data)
            run(q, kp, vp, kf, vf, tables, lens, starts, out, sk, t, b)

        return paged_attention_sinks

    @T.prim_func(private=True, check_well_formed=False)
    def paged_attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_tables: T.handle,
                        var_lens: T.handle, var_starts: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "paged_attention"})
        t = T.int64()
        nb = T.int64()
        b = T.int64()
        mb = T.int64()
        q = T.match_buffer(var_q, (t, hq, d), "float32")
        kp = T.match_buffer(var_k, (nb, hkv, KE, BS), kv_dtype)
        vp = T.match_buffer(var_v, (nb, BS, hkv, VE), kv_dtype)
        tables = T.match_buffer(var_tables, (b, mb), "int64")
        lens = T.match_buffer(var_lens, (b,), "int64")
        starts = T.match_buffer(var_starts, (b + 1,), "int64")
        out = T.match_buffer(var_out, (t, hq, dv), "float32")
        kf = T.decl_buffer((nb * hkv * KE * BS * ELEM // 4,), "float32", data=kp.data)  # (int8: the scales)
        vf = T.decl_buffer((nb * BS * hkv * VE * ELEM // 4,), "float32", data=vp.data)
        run(q, kp, vp, kf, vf, tables, lens, starts, out, None, t, b)

    return paged_attention


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of vectors (last axis) as the int8 pools hold them (numpy: the kernels'
    meaning, for tests and benchmarks)."""
    amax = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32)
    inverse = np.where(amax > 0, np.float32(127) / np.maximum(amax, np.float32(1e-30)), np.float32(0))
    return np.clip(np.round(x * inverse), -127, 127).astype(np.int8), (amax / np.float32(127))[..., 0]


def to_int8_layouts(k_pool: np.ndarray, v_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IR pools [NB, BS, H, D] quantized into the cpu target's int8 layouts (scales in the pool)."""
    nb, bs, h, d = k_pool.shape
    kc, ks = quantize_int8(k_pool)                       # [NB, BS, H, D], [NB, BS, H]
    kp = np.zeros((nb, h, d + SCALE_BYTES, bs), np.int8)
    kp[:, :, :d, :] = kc.transpose(0, 2, 3, 1)
    kp[:, :, d:, :] = np.ascontiguousarray(ks.transpose(0, 2, 1)).view(np.int8).reshape(nb, h, SCALE_BYTES, bs)
    vc, vs = quantize_int8(v_pool)
    vp = np.concatenate([vc, np.ascontiguousarray(vs[..., None]).view(np.int8)], axis=-1)
    return kp, vp


def from_int8_layouts(kp: np.ndarray, vp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values int8 pools stand for, in the IR layout [NB, BS, H, D]."""
    nb, h, rows, bs = kp.shape
    d = rows - SCALE_BYTES
    ks = np.ascontiguousarray(kp[:, :, d:, :]).reshape(nb, h, SCALE_BYTES * bs).view(np.float32)   # [NB, H, BS]
    k = (kp[:, :, :d, :].astype(np.float32) * ks[:, :, None, :]).transpose(0, 3, 1, 2)
    vs = np.ascontiguousarray(vp[..., -SCALE_BYTES:]).view(np.float32)                              # [NB, BS, H, 1]
    v = vp[..., :-SCALE_BYTES].astype(np.float32) * vs
    return np.ascontiguousarray(k), np.ascontiguousarray(v)
