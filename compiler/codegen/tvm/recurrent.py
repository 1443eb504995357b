"""CPU kernels of the recurrent-state step ops (``ir/recurrent.py``): ``causal_conv1d_step`` and
``gated_delta_rule_step``, each over a per-sequence state pool updated in place.

A recurrence runs serially over a sequence's tokens, so both kernels walk each sequence's rows
in order and go wide across what is independent: channels (the convolution; parallel over
channel tiles, vectorized within one) and heads (the delta rule; parallel over heads,
vectorized over the value dim). The state of a sequence lives in its pool slot the whole
time; a sequence whose first token is in this step clears its slot first. Rows no sequence
owns come out zero.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .memo import memoized_kernel


def _lanes(n: int) -> int:
    return next((lanes for lanes in (16, 8, 4) if n % lanes == 0), 1)


@memoized_kernel
def conv_step_kernel(channels: int, width: int, bias: bool, dtype: str = "float32"):
    """PrimFunc (x [T, C], w [C, K], state_slots [B], seq_lens [B], query_start [B + 1], [bias [C],]
    pool [NS, K-1, C] (in place), out [T, C])."""
    C, K = channels, width
    L = _lanes(C)
    CO = C // L
    H = K - 1

    @T.macro
    def body(x, w, slots, lens, starts, bs, pool, out, t, b):
        for i, c in T.grid(t, C):
            out[i, c] = T.cast(0, dtype)
        for s in range(b):
            lo = starts[s]
            n = starts[s + 1] - lo
            if n > T.int64(0):
                slot = slots[s]
                fresh = lens[s] == n
                for co in T.parallel(CO):
                    if fresh:
                        for j in range(H):
                            for ci in T.vectorized(L):
                                pool[slot, j, co * L + ci] = T.cast(0, dtype)
                    acc = T.alloc_local((L,), dtype)
                    for r in range(n):
                        for ci in T.vectorized(L):
                            if bias:  # a Python constant
                                acc[ci] = w[co * L + ci, K - 1] * x[lo + r, co * L + ci] + bs[co * L + ci]
                            else:
                                acc[ci] = w[co * L + ci, K - 1] * x[lo + r, co * L + ci]
                        for j in T.unroll(H):
                            for ci in T.vectorized(L):
                                acc[ci] = acc[ci] + w[co * L + ci, j] * pool[slot, j, co * L + ci]
                        for ci in T.vectorized(L):
                            out[lo + r, co * L + ci] = acc[ci]
                        for j in T.unroll(H - 1):
                            for ci in T.vectorized(L):
                                pool[slot, j, co * L + ci] = pool[slot, j + 1, co * L + ci]
                        for ci in T.vectorized(L):
                            pool[slot, H - 1, co * L + ci] = x[lo + r, co * L + ci]

    if bias:
        @T.prim_func(private=True, check_well_formed=False)
        def causal_conv1d_step_bias(var_x: T.handle, var_w: T.handle, var_slots: T.handle, var_lens: T.handle,
                                    var_starts: T.handle, var_bias: T.handle, var_pool: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "llmc.kind": "causal_conv1d_step"})
            t, b, ns = T.int64(), T.int64(), T.int64()
            x = T.match_buffer(var_x, (t, C), dtype)
            w = T.match_buffer(var_w, (C, K), dtype)
            slots = T.match_buffer(var_slots, (b,), "int64")
            lens = T.match_buffer(var_lens, (b,), "int64")
            starts = T.match_buffer(var_starts, (b + 1,), "int64")
            bs = T.match_buffer(var_bias, (C,), dtype)
            pool = T.match_buffer(var_pool, (ns, H, C), dtype)
            out = T.match_buffer(var_out, (t, C), dtype)
            body(x, w, slots, lens, starts, bs, pool, out, t, b)

        return causal_conv1d_step_bias

    @T.prim_func(private=True, check_well_formed=False)
    def causal_conv1d_step(var_x: T.handle, var_w: T.handle, var_slots: T.handle, var_lens: T.handle,
                           var_starts: T.handle, var_pool: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "causal_conv1d_step"})
        t, b, ns = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(var_x, (t, C), dtype)
        w = T.match_buffer(var_w, (C, K), dtype)
        slots = T.match_buffer(var_slots, (b,), "int64")
        lens = T.match_buffer(var_lens, (b,), "int64")
        starts = T.match_buffer(var_starts, (b + 1,), "int64")
        pool = T.match_buffer(var_pool, (ns, H, C), dtype)
        out = T.match_buffer(var_out, (t, C), dtype)
        body(x, w, slots, lens, starts, None, pool, out, t, b)

    return causal_conv1d_step


@memoized_kernel
def delta_rule_step_kernel(heads: int, dk: int, dv: int, per_channel_gate: bool, delta: bool = True):
    """PrimFunc (q, k [T, H, dk], v [T, H, dv], g [T, H] or [T, H, dk], beta [T, H], state_slots [B],
    seq_lens [B], query_start [B + 1], pool [NS, H, dk, dv] (in place), out [T, H, dv]), float32."""
    H, DK, DV = heads, dk, dv
    delta_rule = delta
    L = _lanes(DV)
    f32 = "float32"
    g_shape = (None, H, DK) if per_channel_gate else (None, H)

    @T.prim_func(private=True, check_well_formed=False)
    def gated_delta_rule_step(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_g: T.handle,
                              var_beta: T.handle, var_slots: T.handle, var_lens: T.handle, var_starts: T.handle,
                              var_pool: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "gated_delta_rule_step"})
        t, b, ns = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (t, H, DK), f32)
        k = T.match_buffer(var_k, (t, H, DK), f32)
        v = T.match_buffer(var_v, (t, H, DV), f32)
        if per_channel_gate:  # a Python constant: the parser keeps only the taken branch
            g = T.match_buffer(var_g, (t, H, DK), f32)
        else:
            g = T.match_buffer(var_g, (t, H), f32)
        beta = T.match_buffer(var_beta, (t, H), f32)
        slots = T.match_buffer(var_slots, (b,), "int64")
        lens = T.match_buffer(var_lens, (b,), "int64")
        starts = T.match_buffer(var_starts, (b + 1,), "int64")
        pool = T.match_buffer(var_pool, (ns, H, DK, DV), f32)
        out = T.match_buffer(var_out, (t, H, DV), f32)
        for i, h, d in T.grid(t, H, DV):
            out[i, h, d] = T.float32(0)
        for s in range(b):
            lo = starts[s]
            n = starts[s + 1] - lo
            if n > T.int64(0):
                slot = slots[s]
                fresh = lens[s] == n
                for h in T.parallel(H):
                    upd = T.alloc_local((DV,), f32)
                    if fresh:
                        for a in range(DK):
                            for d in T.vectorized(DV):
                                pool[slot, h, a, d] = T.float32(0)
                    for r in range(n):
                        i = lo + r
                        # decay, then what the state recalls for k_i
                        for d in T.vectorized(DV):
                            upd[d] = T.float32(0)
                        for a in range(DK):
                            if per_channel_gate:
                                decay = T.exp(g[i, h, a])
                            else:
                                decay = T.exp(g[i, h])
                            for d in T.vectorized(DV):
                                pool[slot, h, a, d] = pool[slot, h, a, d] * decay
                                if delta_rule:  # a Python constant
                                    upd[d] = upd[d] + k[i, h, a] * pool[slot, h, a, d]
                        for d in T.vectorized(DV):
                            upd[d] = (v[i, h, d] - upd[d]) * beta[i, h]
                        for a in range(DK):
                            for d in T.vectorized(DV):
                                pool[slot, h, a, d] = pool[slot, h, a, d] + k[i, h, a] * upd[d]
                                out[i, h, d] = out[i, h, d] + q[i, h, a] * pool[slot, h, a, d]

    del g_shape, L
    return gated_delta_rule_step
