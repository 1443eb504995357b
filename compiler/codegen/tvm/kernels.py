"""Tensor-expression (TE) definitions of IR ops: what each kernel computes, not how it loops.

Every op kind gets one builder ``(operands, attrs, out_type, ctx) -> te.Tensor``. Operands are
``te.Tensor``s, ``Scalar`` immediates (from ``constant`` ops) or ``PackedWeight``s (linear
weights stored in the blocked layout [N/NB, K, NB], which lets a kernel stream NB output
columns with contiguous vector loads). A fused region composes these builders into one kernel.
Schedules live in ``schedule.py``; block names set here are how the scheduler recognizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import sympy
from tvm import te, tirx as tir

PACK = 32  # output columns per block of a packed linear weight

TVM_DTYPES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
              "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool"}


@dataclass
class Scalar:
    value: Union[int, float]
    dtype: str

    def expr(self):
        return tir.const(self.value, TVM_DTYPES[self.dtype])


@dataclass
class PackedWeight:
    """A [N, K] weight stored as [N/PACK, K, PACK]; ``tensor`` is the packed placeholder."""

    tensor: te.Tensor
    n: int
    k: int

    def at(self, n, k):
        return self.tensor[n // PACK, k, n % PACK]


@dataclass
class IntDotWeight:
    """A quantized weight in the integer kernels' layout (``intdot.py``): codes ``[N/L, G, bits*L]``
    int32 or per-group scales/mins ``[N/L, groups, L]``; read here by the float kernels that
    share it (the embedding gather of a table tied to the LM head)."""

    tensor: te.Tensor
    lanes: int
    bits: int
    interleave: int = 1  # column blocks side by side per 32-block (intdot.interleave_blocks)

    def at(self, n, c):  # scales / mins
        b = n // self.lanes
        return self.tensor[b // self.interleave, c, (b % self.interleave) * self.lanes + n % self.lanes]

    def code(self, n, k):  # stored unsigned code
        from .intdot import code_at

        return code_at(self.tensor, n, k, self.lanes, self.bits, self.interleave)


Operand = Union[te.Tensor, Scalar, PackedWeight, IntDotWeight]


class DimMap:
    """Turns IR dims (ints, sympy expressions in T, B, ...) into TIR expressions."""

    def __init__(self, symbols: dict[str, Any]):
        self.symbols = symbols

    def __call__(self, d):
        if isinstance(d, int):
            return tir.IntImm("int64", d)
        return self._expr(sympy.sympify(d))

    def _expr(self, e):
        if e.is_Integer:
            return tir.IntImm("int64", int(e))
        if e.is_Symbol:
            if e.name not in self.symbols:
                raise KeyError(f"symbolic dim {e.name} has no TIR variable")
            return self.symbols[e.name]
        if e.is_Add:
            out = self._expr(e.args[0])
            for a in e.args[1:]:
                out = out + self._expr(a)
            return out
        if e.is_Mul:
            out = self._expr(e.args[0])
            for a in e.args[1:]:
                out = out * self._expr(a)
            return out
        raise NotImplementedError(f"dim expression {e} is not supported by the TVM code generator")

    def shape(self, dims):
        return [self(d) for d in dims]


def value_at(x: Operand, index):
    """Element of an operand at a full index (scalars ignore the index)."""
    if isinstance(x, Scalar):
        return x.expr()
    if isinstance(x, PackedWeight):
        return x.at(*index)
    return x[tuple(index)]


def unpack(x: Operand, name: str = "unpack") -> te.Tensor:
    """A plain tensor view of a packed weight (inlined by the scheduler)."""
    if isinstance(x, PackedWeight):
        return te.compute((x.n, x.k), lambda n, k: x.at(n, k), name=name)
    return x


def broadcast_index(x: Operand, out_rank: int, index):
    """Index into ``x`` for output ``index`` under numpy broadcasting."""
    if isinstance(x, Scalar):
        return []
    shape = x.shape
    offset = out_rank - len(shape)
    return [0 if (isinstance(d, tir.IntImm) and int(d) == 1) else index[offset + i]
            for i, d in enumerate(shape)]


def _cast(e, dtype):
    return e.astype(TVM_DTYPES[dtype]) if e.dtype != TVM_DTYPES[dtype] else e


Builder = Callable[..., te.Tensor]
BUILDERS: dict[str, Builder] = {}


def builder(*kinds: str):
    def deco(fn):
        for k in kinds:
            BUILDERS[k] = fn
        return fn

    return deco


def _sigmoid(e):
    return tir.const(1.0, e.dtype) / (tir.const(1.0, e.dtype) + tir.exp(-e))


def _gelu(e, approximate: str):
    half, one = tir.const(0.5, e.dtype), tir.const(1.0, e.dtype)
    if approximate == "tanh":
        c = tir.const(0.7978845608028654, e.dtype)  # sqrt(2/pi)
        return half * e * (one + tir.tanh(c * (e + tir.const(0.044715, e.dtype) * e * e * e)))
    return half * e * (one + tir.erf(e * tir.const(0.7071067811865476, e.dtype)))


UNARY = {
    "neg": lambda e: -e, "exp": tir.exp, "log": tir.log, "sqrt": tir.sqrt, "rsqrt": tir.rsqrt,
    "tanh": tir.tanh, "sigmoid": _sigmoid, "silu": lambda e: e * _sigmoid(e),
    "relu": lambda e: tir.max(e, tir.const(0, e.dtype)), "cos": tir.cos, "sin": tir.sin,
    "abs": tir.abs, "reciprocal": lambda e: tir.const(1.0, e.dtype) / e,
    # torch's softplus: x itself above the threshold 20, where log(1 + e^x) == x in float
    "softplus": lambda e: tir.if_then_else(e > tir.const(20.0, e.dtype), e,
                                           tir.log1p(tir.exp(tir.min(e, tir.const(20.0, e.dtype))))),
    "log1p": tir.log1p, "floor": tir.floor, "erf": tir.erf, "expm1": lambda e: tir.exp(e) - tir.const(1.0, e.dtype),
}
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": tir.power, "maximum": tir.max, "minimum": tir.min,
}
UNARY["logical_not"] = lambda e: tir.Not(e)
BINARY.update({"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b,
               "le": lambda a, b: a <= b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
               "logical_and": tir.And, "logical_or": tir.Or})
ACTIVATIONS = {"silu": UNARY["silu"], "gelu": lambda e: _gelu(e, "none"), "gelu_tanh": lambda e: _gelu(e, "tanh"),
               "relu": UNARY["relu"]}


@builder(*UNARY)
def _unary(ops, attrs, out, ctx):
    x, f = ops[0], UNARY[ctx.kind]
    return te.compute(ctx.shape(out), lambda *i: f(value_at(x, i)), name=ctx.kind)


@builder("gelu")
def _gelu_op(ops, attrs, out, ctx):
    x = ops[0]
    return te.compute(ctx.shape(out), lambda *i: _gelu(value_at(x, i), attrs["approximate"]), name="gelu")


@builder(*BINARY)
def _binary(ops, attrs, out, ctx):
    a, b = ops
    f, rank = BINARY[ctx.kind], len(out.shape)
    return te.compute(ctx.shape(out), lambda *i: f(value_at(a, broadcast_index(a, rank, i)),
                                                   value_at(b, broadcast_index(b, rank, i))), name=ctx.kind)


@builder("cast")
def _cast_op(ops, attrs, out, ctx):
    x = ops[0]
    return te.compute(ctx.shape(out), lambda *i: _cast(value_at(x, i), attrs["dtype"]), name="cast")


@builder("glu")
def _glu(ops, attrs, out, ctx):
    g, u = ops
    act, rank = ACTIVATIONS[attrs["activation"]], len(out.shape)
    return te.compute(ctx.shape(out), lambda *i: act(value_at(g, broadcast_index(g, rank, i)))
                      * value_at(u, broadcast_index(u, rank, i)), name="glu")


@builder("rope")
def _rope(ops, attrs, out, ctx):
    x, cos, sin = ops
    rank, d = len(out.shape), int(out.shape[-1])
    half = d // 2

    def f(*i):
        last = i[-1]
        partner = list(i[:-1]) + [tir.if_then_else(last < half, last + half, last - half)]
        rotated = tir.if_then_else(last < half, -value_at(x, partner), value_at(x, partner))
        return (value_at(x, i) * value_at(cos, broadcast_index(cos, rank, i))
                + rotated * value_at(sin, broadcast_index(sin, rank, i)))

    return te.compute(ctx.shape(out), f, name="rope")


@builder("rms_norm")
def _rms_norm(ops, attrs, out, ctx):
    x, w = ops
    shape = ctx.shape(out)
    d = shape[-1]
    k = te.reduce_axis((0, d), name="k")
    sumsq = te.compute(shape[:-1], lambda *i: te.sum(value_at(x, list(i) + [k]) * value_at(x, list(i) + [k]), axis=k),
                       name="rms_sumsq")
    eps = tir.const(attrs["eps"], sumsq.dtype)
    offset = attrs["weight_offset"]

    def f(*i):
        scale = tir.rsqrt(sumsq[i[:-1]] / d.astype(sumsq.dtype) + eps)
        weight = value_at(w, [i[-1]])
        if offset:
            weight = weight + tir.const(offset, sumsq.dtype)
        return value_at(x, i) * scale * weight

    return te.compute(shape, f, name="rms_norm")


@builder("where")
def _where(ops, attrs, out, ctx):
    rank = len(out.shape)
    c, a, b = ops
    return te.compute(ctx.shape(out), lambda *i: tir.if_then_else(
        value_at(c, broadcast_index(c, rank, i)), value_at(a, broadcast_index(a, rank, i)),
        value_at(b, broadcast_index(b, rank, i))), name="where")


def _clamped(index, size):
    return tir.max(tir.min(index.astype("int64"), size - 1), tir.IntImm("int64", 0))


@builder("gather")
def _gather(ops, attrs, out, ctx):
    x, idx = unpack(ops[0]), ops[1]
    axis = attrs["axis"] % len(x.shape)

    def f(*i):
        j = list(i)
        j[axis] = _clamped(idx[i], x.shape[axis])
        return x[tuple(j)]

    return te.compute(ctx.shape(out), f, name="gather")


@builder("scatter")
def _scatter(ops, attrs, out, ctx):
    """Each output element looks for an index that names it (a reduction over the indices'
    axis, which is small where scatter appears: router group masks)."""
    x, idx, src = unpack(ops[0]), ops[1], ops[2]
    axis = attrs["axis"] % len(x.shape)
    k1, k2 = te.reduce_axis((0, idx.shape[axis]), name="k1"), te.reduce_axis((0, idx.shape[axis]), name="k2")

    def at(i, k):
        j = list(i)
        j[axis] = k
        return tuple(j)

    def hit(i, k):
        return idx[at(i, k)].astype("int64") == i[axis].astype("int64")

    count = te.compute(ctx.shape(out), lambda *i: te.sum(tir.if_then_else(hit(i, k1), tir.IntImm("int64", 1),
                                                                          tir.IntImm("int64", 0)), axis=k1),
                       name="scatter_count")
    total = te.compute(ctx.shape(out), lambda *i: te.sum(tir.if_then_else(hit(i, k2), src[at(i, k2)],
                                                                          tir.const(0, src.dtype)), axis=k2),
                       name="scatter_sum")
    return te.compute(ctx.shape(out), lambda *i: tir.if_then_else(
        count[i] > 0, total[i] / count[i].astype(total.dtype) if str(total.dtype).startswith("float") else total[i],
        x[i]), name="scatter")


@builder("layer_norm")
def _layer_norm(ops, attrs, out, ctx):
    x = ops[0]
    shape = ctx.shape(out)
    d = shape[-1]
    k1, k2 = te.reduce_axis((0, d), name="k1"), te.reduce_axis((0, d), name="k2")
    total = te.compute(shape[:-1], lambda *i: te.sum(value_at(x, list(i) + [k1]), axis=k1), name="ln_sum")
    n = d.astype(total.dtype)
    mean = te.compute(shape[:-1], lambda *i: total[i] / n, name="ln_mean")
    var = te.compute(shape[:-1], lambda *i: te.sum((value_at(x, list(i) + [k2]) - mean[i])
                                                   * (value_at(x, list(i) + [k2]) - mean[i]), axis=k2), name="ln_var")
    eps = tir.const(attrs["eps"], total.dtype)

    def f(*i):
        y = (value_at(x, i) - mean[i[:-1]]) * tir.rsqrt(var[i[:-1]] / n + eps)
        if len(ops) > 1:
            y = y * value_at(ops[1], [i[-1]])
        if len(ops) > 2:
            y = y + value_at(ops[2], [i[-1]])
        return y

    return te.compute(shape, f, name="layer_norm")


@builder("topk")
def _topk(ops, attrs, out, ctx):
    """Rank of each entry = entries above it (ties: lower index first); slot r takes the entry
    of rank r. Quadratic in the last dim, which is small where topk appears (expert routers)."""
    x = ops[0]
    shape = ctx.shape(out)
    n, k = x.shape[-1], attrs["k"]
    j = te.reduce_axis((0, n), name="j")
    rank = te.compute(list(x.shape), lambda *i: te.sum(tir.if_then_else(
        tir.Or(x[i[:-1] + (j,)] > x[i], tir.And(x[i[:-1] + (j,)] == x[i], j < i[-1])),
        tir.IntImm("int64", 1), tir.IntImm("int64", 0)), axis=j), name="topk_rank")
    m1, m2 = te.reduce_axis((0, n), name="m1"), te.reduce_axis((0, n), name="m2")
    values = te.compute(shape, lambda *i: te.sum(tir.if_then_else(rank[i[:-1] + (m1,)] == i[-1].astype("int64"),
                                                                  x[i[:-1] + (m1,)], tir.const(0, x.dtype)), axis=m1),
                        name="topk_values")
    index = te.compute(shape, lambda *i: te.sum(tir.if_then_else(rank[i[:-1] + (m2,)] == i[-1].astype("int64"),
                                                                 m2.astype("int64"), tir.IntImm("int64", 0)), axis=m2),
                       name="topk_index")
    del k
    return [values, index]


@builder("moe")
def _moe(ops, attrs, out, ctx):
    """Each token through its k selected experts only: the expert id indexes the weights."""
    x, ids, w, up, down = ops[:5]
    up_bias, down_bias = (ops[5], ops[6]) if len(ops) == 7 else (None, None)
    t, d = ctx.shape(out)
    kk, u = ids.shape[1], up.shape[1]
    inner = down.shape[2]
    dt = x.dtype
    if attrs["activation"] == "swish_alpha":
        alpha = attrs["alpha"]
        act = lambda e: e * (tir.const(1.0, dt) / (tir.const(1.0, dt) + tir.exp(-(e * tir.const(alpha, dt)))))  # noqa: E731
    else:
        act = ACTIVATIONS[attrs["activation"]]
    limit, offset = attrs.get("limit", 0.0), attrs.get("up_offset", 0.0)
    experts = up.shape[0]

    def gate(e):
        return tir.min(e, tir.const(limit, dt)) if limit else e

    def upv(e):
        if limit:
            e = tir.max(tir.min(e, tir.const(limit, dt)), tir.const(-limit, dt))
        return e + tir.const(offset, dt) if offset else e

    def expert(ti, ki):
        return tir.max(tir.min(ids[ti, ki].astype("int64"), experts - 1), tir.IntImm("int64", 0))

    r = te.reduce_axis((0, d), name="r")
    proj = te.compute((t, kk, u), lambda ti, ki, ui: te.sum(x[ti, r] * up[expert(ti, ki), ui, r], axis=r),
                      name="moe_up")
    if up_bias is not None:
        proj = te.compute((t, kk, u), lambda ti, ki, ui: proj[ti, ki, ui] + up_bias[expert(ti, ki), ui],
                          name="moe_up_bias")
    if attrs["gated"]:
        if limit or offset:  # clamps / offset as their own stage, so act sees plain loads
            raw = proj
            proj = te.compute((t, kk, u), lambda ti, ki, ui: tir.if_then_else(
                ui < inner, gate(raw[ti, ki, ui]), upv(raw[ti, ki, ui])), name="moe_clamp")
        hidden = te.compute((t, kk, inner), lambda ti, ki, ii: act(proj[ti, ki, ii]) * proj[ti, ki, ii + inner],
                            name="moe_act")
    else:
        hidden = te.compute((t, kk, inner), lambda ti, ki, ii: act(proj[ti, ki, ii]), name="moe_act")
    ri = te.reduce_axis((0, inner), name="ri")
    y = te.compute((t, kk, d), lambda ti, ki, di: te.sum(hidden[ti, ki, ri] * down[expert(ti, ki), di, ri], axis=ri),
                   name="moe_down")
    if down_bias is not None:
        y = te.compute((t, kk, d), lambda ti, ki, di: y[ti, ki, di] + down_bias[expert(ti, ki), di],
                       name="moe_down_bias")
    rk = te.reduce_axis((0, kk), name="rk")
    return te.compute((t, d), lambda ti, di: te.sum(y[ti, rk, di] * w[ti, rk], axis=rk), name="moe")


def _reduce(kind):
    def build(ops, attrs, out, ctx):
        x = ops[0]
        rank = len(x.shape)
        axes = sorted({a % rank for a in attrs["axes"]})
        raxes = [te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes]

        def index(i):
            it, full = iter(i), []
            for a in range(rank):
                if a in axes:
                    full.append(raxes[axes.index(a)])
                    if attrs["keepdim"]:
                        next(it)
                else:
                    full.append(next(it))
            return full

        shape = ctx.shape(out)
        if kind == "max":
            return te.compute(shape, lambda *i: te.max(x[tuple(index(i))], axis=raxes), name="reduce_max")
        total = te.compute(shape, lambda *i: te.sum(x[tuple(index(i))], axis=raxes), name="reduce_sum")
        if kind == "sum":
            return total
        count = 1
        for a in axes:
            count = count * x.shape[a]
        return te.compute(shape, lambda *i: total[i] / count.astype(total.dtype), name="reduce_mean")

    return build


for _k in ("sum", "mean", "max"):
    BUILDERS[_k] = _reduce(_k)


@builder("softmax")
def _softmax(ops, attrs, out, ctx):
    x = ops[0]
    shape = ctx.shape(out)
    axis = attrs["axis"] % len(shape)
    k1 = te.reduce_axis((0, shape[axis]), name="k1")
    k2 = te.reduce_axis((0, shape[axis]), name="k2")

    def at(i, k):
        j = list(i)
        j[axis] = k
        return tuple(j)

    red_shape = [s for a, s in enumerate(shape) if a != axis]

    def full(i):
        return list(i[:axis]) + [0] + list(i[axis:])

    mx = te.compute(red_shape, lambda *i: te.max(x[at(full(i), k1)], axis=k1), name="softmax_max")
    ex = te.compute(shape, lambda *i: tir.exp(x[i] - mx[tuple(i[:axis] + i[axis + 1:])]), name="softmax_exp")
    sm = te.compute(red_shape, lambda *i: te.sum(ex[at(full(i), k2)], axis=k2), name="softmax_sum")
    return te.compute(shape, lambda *i: ex[i] / sm[tuple(i[:axis] + i[axis + 1:])], name="softmax")


@builder("linear")
def _linear(ops, attrs, out, ctx):
    x, w = ops[0], ops[1]
    bias = ops[2] if len(ops) == 3 else None
    weight = (lambda n, kk: w.at(n, kk)) if isinstance(w, PackedWeight) else (lambda n, kk: w[n, kk])
    y = _linear_of(x, weight, isinstance(w, PackedWeight), ctx.shape(out))
    if bias is None:
        return y
    return te.compute(y.shape, lambda *i: y[i] + value_at(bias, [i[-1]]), name="bias_add")


def _linear_of(x, weight, packed: bool, shape, prefix: str = "linear"):
    """``y[..., n] = sum_k x[..., k] * weight(n, k)``; block names start with "linear" so the
    scheduler gives it the register-tiled linear schedule."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    lead = shape[:-1]
    rows = _product(lead)
    if packed and not isinstance(rows, tir.IntImm):
        return _padded_linear(x, weight, lead, rows, shape, k, prefix)
    name = f"{prefix}_packed" if packed else prefix
    return te.compute(shape, lambda *i: te.sum(x[tuple(i[:-1]) + (k,)] * weight(i[-1], k), axis=k), name=name)


def _element(t):
    return (lambda n, c: t.at(n, c)) if isinstance(t, (PackedWeight, IntDotWeight)) else (lambda n, c: t[n, c])


def _codebook_value(q, codebook, dtype: str):
    """``codebook[q]`` for an integer index 0..15: a binary tree of selects on the index's bits
    (four compares; the float path of IQ4/MXFP4 codes, whose fast path is intdot's ``vpshufb``)."""
    def pick(lo: int, width: int):
        if width == 1:
            return tir.const(float(codebook[lo]), dtype)
        half = width // 2
        return tir.Select(q < tir.const(lo + half, "int32"), pick(lo, half), pick(lo + half, half))
    return pick(0, len(codebook))


def dequantized(codes, scales, mins, bits: int, group: int, signed: bool, dtype: str = "float32", codebook=None):
    """``w(n, k)`` of llmc's quantized layout (ir/quant.py) as a TE expression: the code is
    unpacked and scaled in registers where the kernel reads it, never stored as float."""
    code_at, scale_at = _element(codes), _element(scales)
    min_at = _element(mins) if mins is not None else None

    def w(n, k):
        offset = 0  # stored unsigned, offset by half the range if signed (not for codebook indices)
        if isinstance(codes, IntDotWeight):
            c = codes.code(n, k)
            offset = (1 << (bits - 1)) if signed else 0
        elif bits == 4:
            byte = code_at(n, k // 2)
            shift = (k % 2 * 4).astype(byte.dtype)
            c = (byte >> shift) & tir.const(15, byte.dtype)
            offset = 8 if signed else 0
        else:
            c = code_at(n, k)
        if codebook is not None:  # unsigned 4-bit indices
            q = _codebook_value(c.astype("int32"), codebook, dtype)
        else:
            q = c.astype(dtype)
            if offset:
                q = q - tir.const(offset, dtype)
        g = k // group
        v = scale_at(n, g).astype(dtype) * q
        return v + min_at(n, g).astype(dtype) if min_at is not None else v

    return w


@builder("quantized_linear")
def _quantized_linear(ops, attrs, out, ctx):
    x, codes, scales = ops[0], ops[1], ops[2]
    mins = ops[3] if len(ops) == 4 else None
    weight = dequantized(codes, scales, mins, attrs["bits"], attrs["group_size"], attrs["signed"], x.dtype,
                         attrs.get("codebook"))
    return _linear_of(x, weight, isinstance(codes, PackedWeight), ctx.shape(out), prefix="linear_q")


@builder("quantized_embedding")
def _quantized_embedding(ops, attrs, out, ctx):
    ids, codes, scales = ops[0], ops[1], ops[2]
    mins = ops[3] if len(ops) == 4 else None
    if isinstance(codes, IntDotWeight):
        rows = int(codes.tensor.shape[0]) * codes.lanes * codes.interleave
    else:
        rows = codes.n if isinstance(codes, PackedWeight) else codes.shape[0]
    weight = dequantized(codes, scales, mins, attrs["bits"], attrs["group_size"], attrs["signed"],
                         codebook=attrs.get("codebook"))
    last = tir.IntImm("int64", int(rows) - 1) if isinstance(rows, int) else rows - 1

    def f(*i):
        row = tir.max(tir.min(ids[i[:-1]].astype("int64"), last), tir.IntImm("int64", 0))
        return weight(row, i[-1])

    return te.compute(ctx.shape(out), f, name="embedding_q")


ROW_TILE = 8  # token rows per register tile of a prefill linear (see schedule.py)


def _product(dims):
    """Product of dims; TIR folds constant operands, so static dims give an IntImm."""
    out = tir.IntImm("int64", 1)
    for d in dims:
        out = out * d
    return out


def _padded_linear(x, weight, lead, rows, shape, k, prefix: str = "linear"):
    """Linear over a dynamic number of rows, computed on rows rounded up to ROW_TILE.

    The padding rows re-read the last real row (clamped index), so the hot loop needs no
    bounds predicate and its accumulators stay in registers; a crop produces the real rows."""
    padded = (rows + (ROW_TILE - 1)) // ROW_TILE * ROW_TILE

    def row_of(r):
        return _unravel(tir.min(r, rows - 1), lead)

    ypad = te.compute((padded, shape[-1]), lambda r, n: te.sum(
        x[tuple(row_of(r)) + (k,)] * weight(n, k), axis=k), name=f"{prefix}_packed_rows")
    return te.compute(shape, lambda *i: ypad[_ravel(i[:-1], lead), i[-1]], name="pad_crop")


@builder("matmul")
def _matmul(ops, attrs, out, ctx):
    a, b = unpack(ops[0]), unpack(ops[1])
    shape = ctx.shape(out)
    rank = len(shape)
    k = te.reduce_axis((0, a.shape[-1]), name="k")

    def f(*i):
        ia = broadcast_index(a, rank, list(i[:-2]) + [0, 0])[:-2] + [i[-2], k]
        ib = broadcast_index(b, rank, list(i[:-2]) + [0, 0])[:-2] + [k, i[-1]]
        return te.sum(a[tuple(ia)] * b[tuple(ib)], axis=k)

    return te.compute(shape, f, name="matmul")


@builder("embedding")
def _embedding(ops, attrs, out, ctx):
    table, ids = ops
    rows = table.n if isinstance(table, PackedWeight) else table.shape[0]

    def f(*i):
        row = tir.max(tir.min(ids[i[:-1]].astype("int64"), tir.IntImm("int64", int(rows) - 1) if isinstance(rows, int)
                              else rows - 1), tir.IntImm("int64", 0))
        return value_at(table, [row, i[-1]])

    return te.compute(ctx.shape(out), f, name="embedding")


def _unravel(flat, shape):
    index = []
    for d in reversed(shape):
        index.append(flat % d)
        flat = flat // d
    return list(reversed(index))


def _ravel(index, shape):
    flat = tir.IntImm("int64", 0)
    for i, d in zip(index, shape):
        flat = flat * d + i
    return flat


def _splat(x: Scalar, shape, name: str) -> te.Tensor:
    """A constant broadcast to a shape (reshape/expand of a scalar constant)."""
    return te.compute(shape, lambda *i: x.expr(), name=name)


@builder("reshape")
def _reshape(ops, attrs, out, ctx):
    shape = ctx.shape(out)
    if isinstance(ops[0], Scalar):
        return _splat(ops[0], shape, "reshape")
    x = unpack(ops[0])
    return te.compute(shape, lambda *i: x[tuple(_unravel(_ravel(i, shape), x.shape))], name="reshape")


@builder("permute")
def _permute(ops, attrs, out, ctx):
    x, perm = unpack(ops[0]), attrs["perm"]

    def f(*i):
        src = [None] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = i[out_axis]
        return x[tuple(src)]

    return te.compute(ctx.shape(out), f, name="permute")


@builder("expand")
def _expand(ops, attrs, out, ctx):
    shape = ctx.shape(out)
    if isinstance(ops[0], Scalar):
        return _splat(ops[0], shape, "expand")
    x = unpack(ops[0])
    return te.compute(shape, lambda *i: x[tuple(broadcast_index(x, len(shape), i))], name="expand")


@builder("slice")
def _slice(ops, attrs, out, ctx):
    x = unpack(ops[0])
    axis, start, step = attrs["axis"], ctx.dim(attrs["start"]), attrs["step"]

    def f(*i):
        j = list(i)
        j[axis] = start + i[axis] * step
        return x[tuple(j)]

    return te.compute(ctx.shape(out), f, name="slice")


@builder("concat")
def _concat(ops, attrs, out, ctx):
    xs = [unpack(o) for o in ops]
    axis = attrs["axis"]
    offsets, total = [], tir.IntImm("int64", 0)
    for x in xs:
        offsets.append(total)
        total = total + x.shape[axis]

    def value(n, i):
        j = list(i)
        size = xs[n].shape[axis]
        j[axis] = tir.min(tir.max(i[axis] - offsets[n], tir.IntImm("int64", 0)), size - 1)
        return xs[n][tuple(j)]

    def f(*i):
        result = value(len(xs) - 1, i)
        for n in range(len(xs) - 2, -1, -1):
            result = tir.if_then_else(i[axis] < offsets[n + 1], value(n, i), result)
        return result

    return te.compute(ctx.shape(out), f, name="concat")
