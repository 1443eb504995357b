"""Attention kernels of the cpu target: causal (optionally windowed, soft-capped) attention of
this step's queries over one sequence's KV cache (keys [Hkv, D, S], values [S, Hkv, Dv]).

Two kernels, because prefill and decode want different things:

- ``prefill_attention``, a hand-written TIR loop nest in the flash-attention style: each
  parallel work item takes ``rows`` consecutive queries of every query head sharing one KV
  head, walks the key blocks up to the tile's last position (blocks above the causal
  diagonal, or before a sliding window, are never touched), keeps the running max, sum and
  output per row (online softmax), and never materializes a [T, H, S] score tensor. Scores
  for ``rows x group`` query rows share each key vector load; exp is a vectorized
  polynomial (``fast_exp``) instead of one libm call per lane.
- ``attention_te`` for decode (one query): TE stages that the scheduler in ``schedule.py``
  parallelizes over heads, which suits a single query better than tiles over queries.
"""

from __future__ import annotations

from tvm import te, tirx as tir
from tvm.script import tirx as T

KEY_BLOCK = 32  # keys per online-softmax step of the prefill kernel (two 16-lane vectors)
ACCUMULATOR_VECTORS = 24  # score vectors a tile may keep in registers (AVX-512 has 32)
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


def prefill_rows(group: int) -> int:
    """Query rows per tile: as many as keep rows x group x (KEY_BLOCK / 16) score vectors in registers."""
    return max(1, min(4, ACCUMULATOR_VECTORS // (group * (KEY_BLOCK // 16))))


def prefill_attention(hq: int, hkv: int, d: int, dv: int, seq_len: int, scale: float, window: int,
                      softcap: float) -> tir.PrimFunc:
    """PrimFunc ``(q [t, hq, d], k_cache, v_cache, pos [t], out [t, hq, dv])`` for float32 caches
    of ``seq_len`` positions (a multiple of KEY_BLOCK)."""
    if seq_len % KEY_BLOCK:
        raise ValueError(f"KV cache length {seq_len} is not a multiple of {KEY_BLOCK}")
    G, B, S = hq // hkv, KEY_BLOCK, seq_len
    R = prefill_rows(G)
    scale, softcap = float(scale), float(softcap)

    def allowed(j, p):  # key position j visible to a query at position p (float-free, no ==)
        if window > 0:
            return tir.all(j <= p, p - j < window)
        return j <= p

    def first_block(lowest_position):  # the first key block a sliding window still sees
        if window > 0:
            return tir.max(lowest_position - (window - 1), tir.const(0, "int64")) // B
        return tir.const(0, "int64")

    def capped(s):
        if softcap > 0:
            return tir.const(softcap, "float32") * tir.tanh(s * tir.const(scale / softcap, "float32"))
        return s * tir.const(scale, "float32")

    @T.prim_func(private=True, check_well_formed=False)
    def attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "attention"})
        t = T.int64()
        q = T.match_buffer(var_q, (t, hq, d), "float32")
        kc = T.match_buffer(var_k, (hkv, d, S), "float32")
        vc = T.match_buffer(var_v, (S, hkv, dv), "float32")
        pos = T.match_buffer(var_pos, (t,), "int64")
        out = T.match_buffer(var_out, (t, hq, dv), "float32")
        tiles = (t + R - 1) // R
        for item in T.parallel(tiles * hkv):
            s = T.alloc_local((R, G, B), "float32")
            p = T.alloc_local((R, G, B), "float32")
            acc = T.alloc_local((R, G, dv), "float32")
            m = T.alloc_local((R, G), "float32")
            l = T.alloc_local((R, G), "float32")
            bounds = T.alloc_local((2,), "int64")
            hk = item % hkv
            i0 = item // hkv * R
            bounds[0] = T.int64(S - 1)
            bounds[1] = T.int64(0)
            for r in range(R):
                bounds[0] = T.min(bounds[0], pos[T.min(i0 + r, t - 1)])
                bounds[1] = T.max(bounds[1], pos[T.min(i0 + r, t - 1)])
            first = first_block(bounds[0])
            last = T.min(bounds[1], T.int64(S - 1)) // B
            for r, g in T.grid(R, G):
                m[r, g] = T.float32(NEG)
                l[r, g] = T.float32(0)
                for e in T.vectorized(dv):
                    acc[r, g, e] = T.float32(0)
            for kb in range(first, last + 1):
                for r, g in T.grid(R, G):
                    for jj in T.vectorized(B):
                        s[r, g, jj] = T.float32(0)
                for kd in range(d):
                    for r in T.unroll(R):
                        for g in T.unroll(G):
                            for jj in T.vectorized(B):
                                s[r, g, jj] = s[r, g, jj] + q[T.min(i0 + r, t - 1), hk * G + g, kd] * kc[hk, kd, kb * B + jj]
                for r, g in T.grid(R, G):
                    for jj in T.vectorized(B):
                        s[r, g, jj] = T.if_then_else(allowed(kb * B + jj, pos[T.min(i0 + r, t - 1)]),
                                                     capped(s[r, g, jj]), T.float32(NEG))
                    top = T.alloc_local((1,), "float32")
                    top[0] = m[r, g]
                    for jj in range(B):
                        top[0] = T.max(top[0], s[r, g, jj])
                    for jj in T.vectorized(B):
                        p[r, g, jj] = T.if_then_else(s[r, g, jj] > T.float32(NEG), fast_exp(s[r, g, jj] - top[0]),
                                                     T.float32(0))
                    total = T.alloc_local((1,), "float32")
                    total[0] = T.float32(0)
                    for jj in range(B):
                        total[0] = total[0] + p[r, g, jj]
                    rescale = fast_exp(m[r, g] - top[0])
                    l[r, g] = l[r, g] * rescale + total[0]
                    m[r, g] = top[0]
                    for e in T.vectorized(dv):
                        acc[r, g, e] = acc[r, g, e] * rescale
                    for jj in T.unroll(B):
                        for e in T.vectorized(dv):
                            acc[r, g, e] = acc[r, g, e] + p[r, g, jj] * vc[kb * B + jj, hk, e]
            for r, g in T.grid(R, G):
                if i0 + r < t:
                    for e in T.vectorized(dv):
                        out[i0 + r, hk * G + g, e] = acc[r, g, e] / l[r, g]

    return attention


def attention_te(q, kc, vc, pos, n_ctx, attrs):
    """Causal (optionally windowed, soft-capped) attention of T queries over n_ctx cached positions,
    as TE stages (scores, max, exp, sum, probabilities x values) for ``schedule.py``."""
    t, hq, d = q.shape
    hkv, dv = kc.shape[0], vc.shape[2]
    group = hq // hkv
    scale, window, softcap = attrs["scale"], attrs["window"], attrs["softcap"]
    kd = te.reduce_axis((0, d), name="kd")
    dtype = q.dtype
    score = te.compute((t, hq, n_ctx), lambda i, h, j: te.sum(q[i, h, kd] * kc[h // group, kd, j], axis=kd),
                       name="attn_score")

    def allowed(i, j):
        ok = j <= pos[i]
        if window > 0:
            ok = tir.all(ok, pos[i] - j < window)
        return ok

    def scaled(i, h, j):
        s = score[i, h, j] * tir.const(scale, dtype)
        if softcap > 0:
            s = tir.const(softcap, dtype) * tir.tanh(s / tir.const(softcap, dtype))
        return s

    neg_inf = tir.min_value(dtype)
    j1 = te.reduce_axis((0, n_ctx), name="j1")
    mx = te.compute((t, hq), lambda i, h: te.max(tir.if_then_else(allowed(i, j1), scaled(i, h, j1), neg_inf), axis=j1),
                    name="attn_max")
    ex = te.compute((t, hq, n_ctx), lambda i, h, j: tir.if_then_else(
        allowed(i, j), tir.exp(scaled(i, h, j) - mx[i, h]), tir.const(0.0, dtype)), name="attn_exp")
    j2 = te.reduce_axis((0, n_ctx), name="j2")
    sm = te.compute((t, hq), lambda i, h: te.sum(ex[i, h, j2], axis=j2), name="attn_sum")
    j3 = te.reduce_axis((0, n_ctx), name="j3")
    acc = te.compute((t, hq, dv), lambda i, h, e: te.sum(ex[i, h, j3] * vc[j3, h // group, e], axis=j3),
                     name="attn_pv")
    return te.compute((t, hq, dv), lambda i, h, e: acc[i, h, e] / sm[i, h], name="attn_out")
