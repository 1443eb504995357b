"""Recurrent-state ops: short causal convolutions and gated delta-rule linear attention.

Hybrid and linear-attention models (LFM2, Qwen3-Next / Qwen3.5, Kimi-Linear, OLMo-hybrid...)
carry per-sequence state from step to step besides (or instead of) a KV cache: the last K-1
inputs of a depthwise causal convolution, and a [dk, dv] matrix per head that a delta rule
updates token by token. As imported, that state is implicit (like ``attention``'s cache):
``causal_conv1d`` and ``gated_delta_rule`` keep it per ``state`` index and start from zeros
when a step begins at position 0. The paged-kv pass makes it explicit: the ``_step`` forms
read and update one slot per sequence of a state pool ([NS, ...], NS slots), chosen by the
step's ``state_slots`` input; a sequence whose first token is in this step (seq_lens[b] equals
its token count) starts from zeros, so the runtime never has to clear a slot.

This module registers the type rules and holds the reference meanings the interpreter uses.
"""

from __future__ import annotations

import torch

from .ops import _index_tensor, register_op
from .types import TensorType, dims_equal, normalize_dim

STATE_OPS = ("causal_conv1d", "gated_delta_rule")
STEP_OPS = {"causal_conv1d": "causal_conv1d_step", "gated_delta_rule": "gated_delta_rule_step"}
STATEFUL_OPS = STATE_OPS + tuple(STEP_OPS.values())  # every op that reads or writes a recurrent state


def _conv_types(x: TensorType, w: TensorType, bias, what: str) -> None:
    if x.rank != 2 or w.rank != 2:
        raise TypeError(f"{what} takes x [T, C] and weight [C, K], got {x} and {w}")
    if not dims_equal(x.shape[1], w.shape[0]):
        raise TypeError(f"{what}: x {x} and weight {w} disagree on the channel count")
    if not isinstance(w.shape[1], int) or w.shape[1] < 1:
        raise TypeError(f"{what}: the kernel width (weight dim 1) must be a positive constant, got {w}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], x.shape[1])):
        raise TypeError(f"{what}: bias must be [C], got {bias}")
    if x.dtype != w.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{what}: x, weight and bias must share one dtype")


@register_op("causal_conv1d", min_operands=3, attrs={"state": "int"}, has_effects=True)
def _causal_conv1d(types, attrs, ctx):
    """Depthwise causal convolution over the tokens of one sequence, with its state.

    x [T, C], weight [C, K], positions [T], optional bias [C] -> [T, C]:
    y[t, c] = bias[c] + sum_j weight[c, j] * u[t + j, c], u = (the K-1 inputs before this
    step, zeros at position 0) ++ x. The last K-1 rows of u become state ``state``."""
    if len(types) not in (3, 4):
        raise TypeError(f"causal_conv1d takes x, weight, positions and an optional bias, got {len(types)} operands")
    x, w, pos = types[:3]
    _conv_types(x, w, types[3] if len(types) == 4 else None, "causal_conv1d")
    _index_tensor(pos, 1, "causal_conv1d positions")
    if not dims_equal(pos.shape[0], x.shape[0]):
        raise TypeError(f"causal_conv1d positions {pos} disagree with x {x} on the token dim")
    return [x]


def _rule_types(types, what: str) -> TensorType:
    q, k, v, g, beta = types[:5]
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise TypeError(f"{what} takes q, k [T, H, dk] and v [T, H, dv], got {q}, {k}, {v}")
    if q.shape[:3] != k.shape[:3] and not all(dims_equal(a, b) for a, b in zip(q.shape, k.shape)):
        raise TypeError(f"{what}: q {q} and k {k} differ")
    for t in (v, g, beta):
        if t.rank < 2 or not (dims_equal(t.shape[0], q.shape[0]) and dims_equal(t.shape[1], q.shape[1])):
            raise TypeError(f"{what}: {t} disagrees with q {q} on tokens or heads")
    if beta.rank != 2:
        raise TypeError(f"{what}: beta must be [T, H], got {beta}")
    if g.rank == 3 and not dims_equal(g.shape[2], q.shape[2]):
        raise TypeError(f"{what}: a per-channel gate must be [T, H, dk], got {g}")
    if g.rank not in (2, 3):
        raise TypeError(f"{what}: the gate must be [T, H] or [T, H, dk], got {g}")
    if len({t.dtype for t in types[:5]}) != 1:
        raise TypeError(f"{what}: q, k, v, g and beta must share one dtype")
    return TensorType((q.shape[0], q.shape[1], v.shape[2]), q.dtype)


@register_op("gated_delta_rule", num_operands=6, attrs={"state": "int"}, optional_attrs={"delta": "bool"},
             has_effects=True)
def _gated_delta_rule(types, attrs, ctx):
    """Gated delta-rule linear attention over the tokens of one sequence, with its state.

    q, k [T, H, dk], v [T, H, dv], g [T, H] (or per key channel [T, H, dk]), beta [T, H],
    positions [T] -> [T, H, dv]. Per head, with S [dk, dv] (zeros at position 0, else state
    ``state``), token by token: S <- S * exp(g_t) (row i by g_t[i] when per channel);
    S <- S + k_t (beta_t (v_t - k_t S)); o_t = q_t S. Normalization and scaling of q, k are
    ordinary ops before it. With ``delta = false`` the update is plain gated linear attention,
    S <- S + k_t (beta_t v_t) (Mamba's selective scan and Mamba-2's SSD in recurrent form)."""
    out = _rule_types(types, "gated_delta_rule")
    _index_tensor(types[5], 1, "gated_delta_rule positions")
    return [out]


def _step_operands(types, n_inputs: int, what: str):
    pool = types[0]
    slots, seq_lens, query_start = types[1 + n_inputs:4 + n_inputs]
    for t, name in ((slots, "state_slots"), (seq_lens, "seq_lens"), (query_start, "query_start")):
        _index_tensor(t, 1, f"{what} {name}")
    if not dims_equal(slots.shape[0], seq_lens.shape[0]) or not dims_equal(query_start.shape[0], seq_lens.shape[0] + 1):
        raise TypeError(f"{what}: state_slots {slots}, seq_lens {seq_lens} and query_start {query_start} disagree "
                        f"on the sequence count")
    return pool


@register_op("causal_conv1d_step", min_operands=6)
def _causal_conv1d_step(types, attrs, ctx):
    """causal_conv1d for a batch of sequences over a state pool (after paged-kv).

    pool [NS, K-1, C], x [T, C], weight [C, K], state_slots [B], seq_lens [B], query_start [B + 1],
    optional bias [C] -> (y [T, C], pool updated). Sequence b owns rows query_start[b] ..
    query_start[b+1]-1 and state slot state_slots[b]; it starts from zeros when seq_lens[b]
    equals its row count (its first token is in this step). Rows no sequence owns are zero.
    The pool operand is dead afterwards (updated in place, INVARIANTS.md)."""
    if len(types) not in (6, 7):
        raise TypeError(f"causal_conv1d_step takes pool, x, weight, state_slots, seq_lens, query_start and an "
                        f"optional bias, got {len(types)} operands")
    pool = _step_operands(types, 2, "causal_conv1d_step")
    x, w = types[1:3]
    _conv_types(x, w, types[6] if len(types) == 7 else None, "causal_conv1d_step")
    k = w.shape[1]
    if pool.rank != 3 or not dims_equal(pool.shape[1], k - 1) or not dims_equal(pool.shape[2], x.shape[1]) \
            or pool.dtype != x.dtype:
        raise TypeError(f"causal_conv1d_step: the state pool must be {x.dtype}[NS, {k - 1}, {x.shape[1]}], got {pool}")
    return [x, pool]


@register_op("gated_delta_rule_step", num_operands=9, optional_attrs={"delta": "bool"})
def _gated_delta_rule_step(types, attrs, ctx):
    """gated_delta_rule for a batch of sequences over a state pool (after paged-kv).

    pool [NS, H, dk, dv], q, k, v, g, beta (as gated_delta_rule), state_slots [B], seq_lens [B],
    query_start [B + 1] -> (o [T, H, dv], pool updated); sequences, slots and fresh starts as in
    causal_conv1d_step."""
    pool = _step_operands(types, 5, "gated_delta_rule_step")
    out = _rule_types(types[1:6], "gated_delta_rule_step")
    q, v = types[1], types[3]
    want = (q.shape[1], q.shape[2], v.shape[2])
    if pool.rank != 4 or not all(dims_equal(a, b) for a, b in zip(pool.shape[1:], want)) or pool.dtype != q.dtype:
        raise TypeError(f"gated_delta_rule_step: the state pool must be {q.dtype}[NS, {', '.join(map(str, want))}], "
                        f"got {pool}")
    return [out, pool]


def state_shape(op) -> tuple[tuple, str]:
    """The per-slot state shape and dtype of an unpaged state op (what paged-kv pools)."""
    if op.kind == "causal_conv1d":
        x, w = op.operands[0].type, op.operands[1].type
        return (normalize_dim(w.shape[1] - 1), x.shape[1]), x.dtype
    q, v = op.operands[0].type, op.operands[2].type
    return (q.shape[1], q.shape[2], v.shape[2]), q.dtype


# --------------------------------------------------------------------------- meanings


class StateError(RuntimeError):
    pass


def conv_run(state: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None):
    """One sequence's rows x [n, C] from state [K-1, C]: (y [n, C], new state)."""
    k = w.shape[1]
    u = torch.cat([state.to(x.dtype), x], dim=0)
    n = x.shape[0]
    y = sum(w[:, j] * u[j:j + n] for j in range(k))
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), u[u.shape[0] - (k - 1):].clone()


def delta_rule_run(state, q, k, v, g, beta, delta: bool = True):
    """One sequence's rows (q, k [n, H, dk], v [n, H, dv], g [n, H(, dk)], beta [n, H]) from
    state [H, dk, dv] (float32): (o [n, H, dv], new state)."""
    s = state.float().clone()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32)
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    for t in range(q.shape[0]):
        decay = g[t].exp()
        s = s * (decay[:, :, None] if g.dim() == 3 else decay[:, None, None])
        mem = torch.einsum("hk,hkv->hv", k[t], s) if delta else 0.0
        update = (v[t] - mem) * beta[t][:, None]
        s = s + k[t][:, :, None] * update[:, None, :]
        out[t] = torch.einsum("hk,hkv->hv", q[t], s)
    return out.to(v.dtype), s


def _zeros(kind: str, operands) -> torch.Tensor:
    if kind == "causal_conv1d":
        x, w = operands[0], operands[1]
        return x.new_zeros((w.shape[1] - 1, x.shape[1]))
    q, v = operands[0], operands[2]
    return torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)


def _run(kind: str, state, operands, delta: bool = True):
    if kind == "causal_conv1d":
        x, w = operands[0], operands[1]
        return conv_run(state, x, w, operands[2] if len(operands) > 2 else None)
    return delta_rule_run(state, *operands, delta=delta)


def sequence_reference(kind: str, operands: list, positions: torch.Tensor, states: dict, index: int,
                       delta: bool = True):
    """The meaning of ``causal_conv1d`` / ``gated_delta_rule`` (unpaged): ``states`` maps a state
    index to (state, next position); a step at position 0 starts from zeros."""
    first = int(positions[0]) if positions.numel() else 0
    if positions.numel() and not bool((positions == torch.arange(first, first + positions.numel())).all()):
        raise StateError(f"{kind}: the positions of one step must be consecutive, got {positions.tolist()}")
    if first == 0:
        state = _zeros(kind, operands)
    else:
        if index not in states or states[index][1] != first:
            have = states[index][1] if index in states else None
            raise StateError(f"{kind} state {index}: the step starts at position {first} but the state holds "
                             f"{have if have is not None else 'no'} tokens (run the earlier tokens first)")
        state = states[index][0]
    y, new = _run(kind, state, operands, delta)
    states[index] = (new, first + positions.numel())
    return y


def step_reference(kind: str, pool, operands: list, slots, seq_lens, query_start, delta: bool = True):
    """The meaning of ``causal_conv1d_step`` / ``gated_delta_rule_step``: (out, new pool)."""
    base = STATE_OPS[0] if kind == "causal_conv1d_step" else STATE_OPS[1]
    pool = pool.clone()
    first = operands[0]
    rows = first.shape[0]
    out_cols = operands[2].shape[2] if base == "gated_delta_rule" else first.shape[1]
    out = first.new_zeros((rows, first.shape[1]) + ((out_cols,) if base == "gated_delta_rule" else ()))
    starts = [int(s) for s in query_start]
    if starts and (starts[0] < 0 or starts[-1] > rows or any(a > b for a, b in zip(starts, starts[1:]))):
        raise StateError(f"query_start {starts} is not a non-decreasing list of rows within [0, {rows}]")
    for b in range(len(starts) - 1):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        slot = int(slots[b])
        if not 0 <= slot < pool.shape[0]:
            raise StateError(f"sequence {b} names state slot {slot} of a {pool.shape[0]}-slot pool")
        if hi - lo > int(seq_lens[b]):
            raise StateError(f"sequence {b} has {hi - lo} tokens but seq_len {int(seq_lens[b])}")
        per_row = [t[lo:hi] if t.dim() >= 1 and t.shape[0] == rows else t for t in operands]
        if base == "causal_conv1d":  # weight and bias are not per row
            per_row = [operands[0][lo:hi]] + list(operands[1:])
        state = _zeros(base, operands) if int(seq_lens[b]) == hi - lo else pool[slot]
        y, new = _run(base, state, per_row, delta)
        out[lo:hi] = y
        pool[slot] = new.to(pool.dtype)
    return out, pool
