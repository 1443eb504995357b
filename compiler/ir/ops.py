"""The op registry: each op kind declares its operand count, its attributes and, once, its
type-inference rule. The verifier, the builder and the parser all read this one table.

An inference rule takes the operand types, the attributes and a context (the module, for
``param``; the op, for ``fused``) and returns the result types, or raises ``TypeError`` with a
message that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sympy

from .types import DTYPES, TensorType, dims_equal, normalize_dim, product

AttrKind = str  # int | float | str | bool | ints | floats | dims | dim | dtype | float_or_none
InferFn = Callable[[list[TensorType], dict[str, Any], Any], list[TensorType]]


@dataclass
class OpDef:
    kind: str
    infer: InferFn
    num_operands: Optional[int] = None  # None = variadic (at least min_operands)
    min_operands: int = 0
    attrs: dict[str, AttrKind] = field(default_factory=dict)
    optional_attrs: dict[str, AttrKind] = field(default_factory=dict)
    has_region: bool = False
    has_effects: bool = False  # True: never removed or merged even if its result is unused (KV writes)
    doc: str = ""


OPS: dict[str, OpDef] = {}


def register_op(kind, *, num_operands=None, min_operands=0, attrs=None, optional_attrs=None,
                has_region=False, has_effects=False, doc=""):
    """Decorator: register ``infer`` as the type rule of op ``kind``."""

    def deco(fn: InferFn) -> InferFn:
        if kind in OPS:
            raise ValueError(f"op {kind!r} is registered twice")
        OPS[kind] = OpDef(kind, fn, num_operands, min_operands, dict(attrs or {}),
                          dict(optional_attrs or {}), has_region, has_effects, doc or (fn.__doc__ or "").strip())
        return fn

    return deco


def check_attr(kind: AttrKind, value: Any) -> bool:
    def is_dim(v):
        return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, sympy.Expr)

    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "float_or_int":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "ints":
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if kind == "dim":
        return is_dim(value)
    if kind == "dims":
        return isinstance(value, list) and all(is_dim(v) for v in value)
    if kind == "floats":
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if kind == "dtype":
        return value in DTYPES
    raise ValueError(f"unknown attribute kind {kind!r}")


# --------------------------------------------------------------------------- helpers


def _norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise TypeError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    out = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if dims_equal(da, 1):
            out.append(db)
        elif dims_equal(db, 1) or dims_equal(da, db):
            out.append(da)
        else:
            raise TypeError(f"shapes {list(a)} and {list(b)} do not broadcast (dim {da} vs {db})")
    return tuple(reversed(out))


def _same_dtype(types: list[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise TypeError(f"operands must share one dtype, got {sorted(dtypes)}; insert a cast")
    return types[0].dtype


# --------------------------------------------------------------------------- elementwise

UNARY_OPS = ("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "cos", "sin",
             "abs", "reciprocal", "softplus", "log1p", "floor", "erf", "expm1")
BINARY_OPS = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")


def _unary(types, attrs, ctx):
    return [types[0]]


for _k in UNARY_OPS:
    register_op(_k, num_operands=1, doc=f"Elementwise {_k}.")(_unary)


@register_op("gelu", num_operands=1, attrs={"approximate": "str"})
def _gelu(types, attrs, ctx):
    """Elementwise GELU; approximate is "none" (erf) or "tanh"."""
    if attrs["approximate"] not in ("none", "tanh"):
        raise TypeError(f"gelu approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")
    return [types[0]]


def _binary(types, attrs, ctx):
    dtype = _same_dtype(types)
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), dtype)]


for _k in BINARY_OPS:
    register_op(_k, num_operands=2, doc=f"Elementwise {_k} with numpy broadcasting; dtypes must match.")(_binary)


COMPARE_OPS = ("gt", "ge", "lt", "le", "eq", "ne")
LOGICAL_OPS = ("logical_and", "logical_or")


def _compare(types, attrs, ctx):
    _same_dtype(types)
    return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), "bool")]


for _k in COMPARE_OPS:
    register_op(_k, num_operands=2, doc=f"Elementwise comparison {_k} with broadcasting -> bool.")(_compare)


def _logical(types, attrs, ctx):
    if any(t.dtype != "bool" for t in types):
        raise TypeError(f"logical ops take bool operands, got {[t.dtype for t in types]}")
    return [TensorType(broadcast_shapes(types[0].shape, types[-1].shape), "bool")]


for _k in LOGICAL_OPS:
    register_op(_k, num_operands=2, doc=f"Elementwise {_k} of bool tensors.")(_logical)
register_op("logical_not", num_operands=1, doc="Elementwise not of a bool tensor.")(_logical)


@register_op("where", num_operands=3)
def _where(types, attrs, ctx):
    """cond ? a : b elementwise, cond bool, all three broadcast; a and b share a dtype."""
    cond, a, b = types
    if cond.dtype != "bool":
        raise TypeError(f"where takes a bool condition, got {cond}")
    dtype = _same_dtype([a, b])
    return [TensorType(broadcast_shapes(broadcast_shapes(cond.shape, a.shape), b.shape), dtype)]


def _index_like(types, attrs, what):
    x, idx = types[0], types[1]
    axis = _norm_axis(attrs["axis"], x.rank)
    if idx.dtype not in ("i64", "i32") or idx.rank != x.rank:
        raise TypeError(f"{what} indices must be an integer tensor of x's rank {x.rank}, got {idx}")
    for i, (a, b) in enumerate(zip(x.shape, idx.shape)):
        if i != axis and not dims_equal(a, b):
            raise TypeError(f"{what} indices {idx} must match x {x} off axis {axis}")
    return axis


@register_op("gather", num_operands=2, attrs={"axis": "int"})
def _gather(types, attrs, ctx):
    """out[..., j, ...] = x[..., idx[..., j, ...], ...] along axis (torch.gather); idx has x's
    shape except along axis."""
    _index_like(types, attrs, "gather")
    return [TensorType(types[1].shape, types[0].dtype)]


@register_op("scatter", num_operands=3, attrs={"axis": "int"})
def _scatter(types, attrs, ctx):
    """x with x[..., idx[..., j, ...], ...] = src[..., j, ...] along axis (torch.scatter); src
    has idx's shape; duplicate indices leave which value wins unspecified."""
    _index_like(types, attrs, "scatter")
    src = types[2]
    if src.dtype != types[0].dtype or src.rank != types[1].rank or not all(
            dims_equal(a, b) for a, b in zip(src.shape, types[1].shape)):
        raise TypeError(f"scatter source {src} must have the indices' shape {types[1]} and x's dtype")
    return [types[0]]


@register_op("constant", num_operands=0, attrs={"value": "float_or_int", "dtype": "dtype"})
def _constant(types, attrs, ctx):
    """A scalar (rank-0) constant."""
    return [TensorType((), attrs["dtype"])]


@register_op("cast", num_operands=1, attrs={"dtype": "dtype"})
def _cast(types, attrs, ctx):
    """Convert to another dtype (round to nearest for floats, truncation for float → int)."""
    return [TensorType(types[0].shape, attrs["dtype"])]


# --------------------------------------------------------------------------- reductions


def _reduce(types, attrs, ctx):
    t = types[0]
    axes = sorted({_norm_axis(a, t.rank) for a in attrs["axes"]})
    shape = []
    for i, d in enumerate(t.shape):
        if i in axes:
            if attrs["keepdim"]:
                shape.append(1)
        else:
            shape.append(d)
    return [TensorType(tuple(shape), t.dtype)]


for _k in ("sum", "mean", "max"):
    register_op(_k, num_operands=1, attrs={"axes": "ints", "keepdim": "bool"},
                doc=f"Reduce with {_k} over axes.")(_reduce)


@register_op("softmax", num_operands=1, attrs={"axis": "int"})
def _softmax(types, attrs, ctx):
    """Softmax along one axis."""
    _norm_axis(attrs["axis"], types[0].rank)
    return [types[0]]


# --------------------------------------------------------------------------- linear algebra


@register_op("matmul", num_operands=2)
def _matmul(types, attrs, ctx):
    """Batched matmul: [..., M, K] x [..., K, N] -> [..., M, N], batch dims broadcast."""
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise TypeError(f"matmul needs rank >= 2 operands, got {a} and {b}")
    if not dims_equal(a.shape[-1], b.shape[-2]):
        raise TypeError(f"matmul contraction dims differ: {a.shape[-1]} vs {b.shape[-2]}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), _same_dtype(types))]


@register_op("linear", min_operands=2)
def _linear(types, attrs, ctx):
    """x [..., K] · w[N, K]ᵀ (+ bias [N]) -> [..., N]: the layout of torch.nn.Linear weights."""
    if len(types) not in (2, 3):
        raise TypeError(f"linear takes x, w and an optional bias, got {len(types)} operands")
    x, w = types[0], types[1]
    if w.rank != 2:
        raise TypeError(f"linear weight must be rank 2 [N, K], got {w}")
    if not dims_equal(x.shape[-1], w.shape[1]):
        raise TypeError(f"linear input has K={x.shape[-1]} but weight has K={w.shape[1]}")
    if len(types) == 3 and (types[2].rank != 1 or not dims_equal(types[2].shape[0], w.shape[0])):
        raise TypeError(f"linear bias must be [{w.shape[0]}], got {types[2]}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), _same_dtype(types))]


@register_op("embedding", num_operands=2)
def _embedding(types, attrs, ctx):
    """Row gather: table [V, D], ids [...] (integer) -> [..., D]."""
    table, ids = types
    if table.rank != 2:
        raise TypeError(f"embedding table must be rank 2, got {table}")
    if ids.dtype not in ("i64", "i32"):
        raise TypeError(f"embedding ids must be i64 or i32, got {ids.dtype}")
    return [TensorType(ids.shape + (table.shape[1],), table.dtype)]


# --------------------------------------------------------------------------- shape ops


@register_op("reshape", num_operands=1, attrs={"shape": "dims"})
def _reshape(types, attrs, ctx):
    """Same elements, new shape (row-major); element counts must agree."""
    t = types[0]
    shape = tuple(normalize_dim(d) for d in attrs["shape"])
    if not dims_equal(product(t.shape), product(shape)):
        raise TypeError(f"reshape from {list(t.shape)} to {list(shape)} changes the element count")
    return [TensorType(shape, t.dtype)]


@register_op("permute", num_operands=1, attrs={"perm": "ints"})
def _permute(types, attrs, ctx):
    """Reorder axes: result axis i is operand axis perm[i]."""
    t, perm = types[0], attrs["perm"]
    if sorted(perm) != list(range(t.rank)):
        raise TypeError(f"perm {perm} is not a permutation of the {t.rank} axes of {t}")
    return [TensorType(tuple(t.shape[p] for p in perm), t.dtype)]


@register_op("expand", num_operands=1, attrs={"shape": "dims"})
def _expand(types, attrs, ctx):
    """Broadcast to a larger shape (size-1 dims repeat; new leading dims may be added)."""
    t, shape = types[0], tuple(normalize_dim(d) for d in attrs["shape"])
    offset = len(shape) - t.rank
    if offset < 0 or any(
        not (dims_equal(d, 1) or dims_equal(d, shape[offset + i])) for i, d in enumerate(t.shape)
    ):
        raise TypeError(f"cannot expand {list(t.shape)} to {list(shape)}")
    return [TensorType(shape, t.dtype)]


@register_op("slice", num_operands=1, attrs={"axis": "int", "start": "dim", "end": "dim", "step": "int"})
def _slice(types, attrs, ctx):
    """Elements start, start+step, … < end along axis; start/end already clamped to [0, size]."""
    t = types[0]
    axis = _norm_axis(attrs["axis"], t.rank)
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if step < 1:
        raise TypeError(f"slice step must be >= 1, got {step}")
    length = normalize_dim(sympy.ceiling(sympy.sympify(end - start) / step))
    if isinstance(length, int) and length < 0:
        raise TypeError(f"slice [{start}:{end}] has negative length")
    shape = list(t.shape)
    shape[axis] = length
    return [TensorType(tuple(shape), t.dtype)]


@register_op("concat", min_operands=1, attrs={"axis": "int"})
def _concat(types, attrs, ctx):
    """Join along axis; other dims must agree."""
    first = types[0]
    axis = _norm_axis(attrs["axis"], first.rank)
    dtype = _same_dtype(types)
    for t in types[1:]:
        if t.rank != first.rank or any(
            i != axis and not dims_equal(a, b) for i, (a, b) in enumerate(zip(first.shape, t.shape))
        ):
            raise TypeError(f"concat along axis {axis}: {first} and {t} disagree off that axis")
    shape = list(first.shape)
    shape[axis] = normalize_dim(sum((t.shape[axis] for t in types), 0))
    return [TensorType(tuple(shape), dtype)]


# --------------------------------------------------------------------------- model ops


@register_op("param", num_operands=0, attrs={"name": "str"})
def _param(types, attrs, ctx):
    """Read a weight of the module's parameter table."""
    module = getattr(ctx, "module", None)
    if module is None:
        raise TypeError("param op outside a module")
    p = module.params.get(attrs["name"])
    if p is None:
        raise TypeError(f"param @{attrs['name']} is not in the module's parameter table")
    return [p.type]


def _check_sinks(types, q, hq, what):
    if len(types) > 1:
        raise TypeError(f"{what} takes at most one sinks operand after its {what} operands")
    if types:
        sinks = types[0]
        if sinks.rank != 1 or not dims_equal(sinks.shape[0], hq) or sinks.dtype != q.dtype:
            raise TypeError(f"{what} sinks must be {q.dtype}[{hq}] (one logit per query head), got {sinks}")


def _check_alibi(attrs, hq, what):
    alibi = attrs.get("alibi")
    if alibi is not None and isinstance(hq, int) and len(alibi) != hq:
        raise TypeError(f"{what} alibi must hold one slope per query head ({hq}), got {len(alibi)}")


@register_op("attention", min_operands=4, has_effects=True,
             attrs={"layer": "int", "scale": "float", "window": "int", "softcap": "float"},
             optional_attrs={"chunk": "int", "alibi": "floats"})
def _attention(types, attrs, ctx):
    """Causal attention of this step's tokens over the layer's KV cache.

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv], positions [T] -> [T, Hq, Dv]. Semantics: write
    k, v of each token at its position in layer ``layer``'s cache, then each query at position p
    attends to cached positions j with j <= p (and p - j < window when window > 0), logits
    scaled by ``scale`` and, when softcap > 0, passed through softcap·tanh(x/softcap).
    This op is the KV-cache boundary that paged-KV lowering rewrites. An optional fifth
    operand, sinks [Hq], adds one logit per query head to each softmax's denominator
    (attention sinks: probability mass that attends to nothing). With ``chunk`` > 0 (chunked
    attention, Llama 4), a query at p also needs j // chunk == p // chunk: it sees only the
    keys of its own chunk. With ``alibi`` (one slope per query head), the logit of query p
    and key j gains slope_h * (j - p) after scaling and soft-capping (ALiBi: Bloom, MPT).
    """
    q, k, v, pos = types[:4]
    _check_sinks(types[4:], q, q.shape[1] if q.rank == 3 else None, "attention")
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise TypeError(f"attention takes q, k, v as [T, heads, dim], got {q}, {k}, {v}")
    if pos.rank != 1 or pos.dtype not in ("i64", "i32"):
        raise TypeError(f"attention positions must be an integer [T], got {pos}")
    for t in (k, v, pos):
        if not dims_equal(t.shape[0], q.shape[0]):
            raise TypeError(f"attention operands disagree on the token dim: {q} vs {t}")
    if not dims_equal(k.shape[1], v.shape[1]):
        raise TypeError(f"k and v head counts differ: {k} vs {v}")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise TypeError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    if not dims_equal(q.shape[2], k.shape[2]):
        raise TypeError(f"q and k head dims differ: {q} vs {k}")
    if attrs["window"] < 0 or attrs["softcap"] < 0 or attrs.get("chunk", 0) < 0:
        raise TypeError("attention window, softcap and chunk must be >= 0 (0 = off)")
    _check_alibi(attrs, hq, "attention")
    return [TensorType((q.shape[0], hq, v.shape[2]), _same_dtype([q, k, v]))]


def _index_tensor(t: TensorType, rank: int, what: str) -> None:
    if t.rank != rank or t.dtype not in ("i64", "i32"):
        raise TypeError(f"{what} must be an integer tensor of rank {rank}, got {t}")


def _check_pools(k_pool: TensorType, v_pool: TensorType) -> None:
    if k_pool.rank != 4 or v_pool.rank != 4:
        raise TypeError(f"KV pools are [blocks, block_size, kv_heads, dim], got {k_pool} and {v_pool}")
    for axis, what in ((0, "block count"), (1, "block size"), (2, "KV head count")):
        if not dims_equal(k_pool.shape[axis], v_pool.shape[axis]):
            raise TypeError(f"key and value pools disagree on the {what}: {k_pool} vs {v_pool}")
    if not isinstance(k_pool.shape[1], int) or k_pool.shape[1] < 1:
        raise TypeError(f"the KV block size (pool dim 1) must be a positive constant, got {k_pool}")
    if k_pool.dtype != v_pool.dtype:
        raise TypeError(f"key and value pools must share one dtype, got {k_pool.dtype} and {v_pool.dtype}")


@register_op("kv_append", num_operands=5)
def _kv_append(types, attrs, ctx):
    """Write this step's keys and values into a layer's paged KV pools.

    k_pool [NB, BS, Hkv, D], v_pool [NB, BS, Hkv, Dv], k [T, Hkv, D], v [T, Hkv, Dv],
    slot_mapping [T] -> (k_pool, v_pool) updated: token t goes to block slot // BS, offset
    slot % BS; a negative slot writes nothing (padding tokens). The results replace the pool
    operands, which no op may read afterwards (INVARIANTS.md), so code generators update the
    pools in place."""
    k_pool, v_pool, k, v, slots = types
    _check_pools(k_pool, v_pool)
    _index_tensor(slots, 1, "kv_append slot_mapping")
    if k.rank != 3 or v.rank != 3:
        raise TypeError(f"kv_append takes k, v as [T, kv_heads, dim], got {k} and {v}")
    for t in (v, slots):
        if not dims_equal(t.shape[0], k.shape[0]):
            raise TypeError(f"kv_append operands disagree on the token dim: {k} vs {t}")
    if not (dims_equal(k.shape[1], k_pool.shape[2]) and dims_equal(k.shape[2], k_pool.shape[3])):
        raise TypeError(f"keys {k} do not fit the key pool {k_pool}")
    if not (dims_equal(v.shape[1], v_pool.shape[2]) and dims_equal(v.shape[2], v_pool.shape[3])):
        raise TypeError(f"values {v} do not fit the value pool {v_pool}")
    if k.dtype != k_pool.dtype or v.dtype != v_pool.dtype:
        raise TypeError(f"kv_append: k/v dtypes {k.dtype}/{v.dtype} differ from the pool's {k_pool.dtype}")
    return [k_pool, v_pool]


@register_op("paged_attention", min_operands=6,
             attrs={"scale": "float", "window": "int", "softcap": "float"},
             optional_attrs={"chunk": "int", "alibi": "floats"})
def _paged_attention(types, attrs, ctx):
    """Causal attention of a batch's queries over each sequence's blocks of the KV pools.

    q [T, Hq, D], k_pool [NB, BS, Hkv, D], v_pool [NB, BS, Hkv, Dv], block_tables [B, MB],
    seq_lens [B], query_start [B + 1] -> [T, Hq, Dv]. Sequence b owns query rows
    query_start[b] .. query_start[b+1]-1, the last n_b = query_start[b+1] - query_start[b]
    tokens of its seq_lens[b] tokens, so its row i sits at position seq_lens[b] - n_b + i.
    Key position j of sequence b lives in block block_tables[b, j // BS] at offset j % BS. A
    query at position p attends to j <= p (and p - j < window when window > 0), logits scaled
    by ``scale`` and soft-capped when softcap > 0. Rows no sequence owns come out zero. An
    optional seventh operand, sinks [Hq], joins each softmax's denominator, ``chunk`` > 0
    keeps each query within its chunk of positions and ``alibi`` adds per-head linear position
    biases (see attention)."""
    q, k_pool, v_pool, tables, seq_lens, query_start = types[:6]
    _check_sinks(types[6:], q, q.shape[1] if q.rank == 3 else None, "paged_attention")
    _check_pools(k_pool, v_pool)
    _index_tensor(tables, 2, "paged_attention block_tables")
    _index_tensor(seq_lens, 1, "paged_attention seq_lens")
    _index_tensor(query_start, 1, "paged_attention query_start")
    if q.rank != 3:
        raise TypeError(f"paged_attention takes q as [T, heads, dim], got {q}")
    if not dims_equal(seq_lens.shape[0], tables.shape[0]):
        raise TypeError(f"seq_lens {seq_lens} and block_tables {tables} disagree on the sequence count")
    if not dims_equal(query_start.shape[0], tables.shape[0] + 1):
        raise TypeError(f"query_start must hold one more entry than there are sequences, got {query_start} "
                        f"for block_tables {tables}")
    if not dims_equal(q.shape[2], k_pool.shape[3]):
        raise TypeError(f"q and key pool head dims differ: {q} vs {k_pool}")
    hq, hkv = q.shape[1], k_pool.shape[2]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise TypeError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    if q.dtype != k_pool.dtype:
        raise TypeError(f"paged_attention: q is {q.dtype} but the pools are {k_pool.dtype}")
    if attrs["window"] < 0 or attrs["softcap"] < 0 or attrs.get("chunk", 0) < 0:
        raise TypeError("paged_attention window, softcap and chunk must be >= 0 (0 = off)")
    _check_alibi(attrs, hq, "paged_attention")
    return [TensorType((q.shape[0], hq, v_pool.shape[3]), q.dtype)]


@register_op("fused", min_operands=0, attrs={"name": "str"}, has_region=True)
def _fused(types, attrs, ctx):
    """A region emitted as one kernel: its results are its body's results."""
    op = getattr(ctx, "op", None)
    if op is None or op.region is None:
        raise TypeError("fused op without a region")
    body = op.region
    if len(body.args) != len(types):
        raise TypeError(f"fused region takes {len(body.args)} args but has {len(types)} operands")
    for a, t in zip(body.args, types):
        if not a.type.same_as(t):
            raise TypeError(f"fused region arg %{a.name}: {a.type} does not match operand type {t}")
    return [r.type for r in body.results]


# --------------------------------------------------------------------------- recognized ops
# Introduced by the recognition passes; each is exactly the composite it replaces.


@register_op("rms_norm", num_operands=2, attrs={"eps": "float", "weight_offset": "float"})
def _rms_norm(types, attrs, ctx):
    """x * rsqrt(mean(x², last axis) + eps) * (w + weight_offset); w is [D] (Gemma uses offset 1)."""
    x, w = types
    if w.rank != 1 or not dims_equal(w.shape[0], x.shape[-1]):
        raise TypeError(f"rms_norm weight must be [{x.shape[-1]}], got {w}")
    return [TensorType(x.shape, _same_dtype(types))]


@register_op("layer_norm", min_operands=1, attrs={"eps": "float"})
def _layer_norm(types, attrs, ctx):
    """(x - mean(x)) * rsqrt(var(x) + eps) over the last axis (biased variance), then * w and
    + b when given: operands x, x w, or x w b; w and b are [D]."""
    x = types[0]
    if len(types) > 3:
        raise TypeError(f"layer_norm takes x and an optional weight and bias, got {len(types)} operands")
    for t, what in zip(types[1:], ("weight", "bias")):
        if t.rank != 1 or not dims_equal(t.shape[0], x.shape[-1]):
            raise TypeError(f"layer_norm {what} must be [{x.shape[-1]}], got {t}")
    return [TensorType(x.shape, _same_dtype(types))]


@register_op("topk", num_operands=1, attrs={"k": "int"})
def _topk(types, attrs, ctx):
    """The k largest entries along the last axis, largest first: (values, i64 indices); among
    equal values the lower index comes first."""
    x, k = types[0], attrs["k"]
    if x.rank < 1 or not isinstance(x.shape[-1], int) or not 1 <= k <= x.shape[-1]:
        raise TypeError(f"topk k={k} needs a static last dim of at least k, got {x}")
    shape = x.shape[:-1] + (k,)
    return [TensorType(shape, x.dtype), TensorType(shape, "i64")]


MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swish_alpha")


@register_op("moe", min_operands=5, attrs={"activation": "str", "gated": "bool"},
             optional_attrs={"alpha": "float", "limit": "float", "up_offset": "float"})
def _moe(types, attrs, ctx):
    """Mixture-of-experts FFN of routed tokens: each token runs only its k selected experts.

    x [T, D], expert ids [T, K] (integer), routing weights [T, K], up [E, U, D], down [E, D, I]
    and, optionally, up bias [E, U] and down bias [E, D] -> [T, D]. For token t:
    sum_k weights[t, k] * down_e(f(up_e x_t)), e = ids[t, k], with f = act(g) * u over the halves
    g = first I, u = last I rows of up (U = 2I) when gated, else f = act (U = I).
    Optional (GPT-OSS-style gates): ``limit`` > 0 clamps g to <= limit and u to
    [-limit, limit]; ``up_offset`` is added to u; activation swish_alpha is g * sigmoid(alpha g)."""
    if attrs["activation"] == "swish_alpha" and "alpha" not in attrs:
        raise TypeError("moe activation swish_alpha needs an alpha attribute")
    if attrs["activation"] not in MOE_ACTIVATIONS:
        raise TypeError(f"moe activation must be one of {', '.join(MOE_ACTIVATIONS)}, got {attrs['activation']!r}")
    if len(types) not in (5, 7):
        raise TypeError(f"moe takes x, ids, weights, up, down and optionally up_bias, down_bias; got {len(types)}")
    x, ids, w, up, down = types[:5]
    if x.rank != 2 or ids.rank != 2 or w.rank != 2 or up.rank != 3 or down.rank != 3:
        raise TypeError(f"moe takes x [T, D], ids/weights [T, K], up [E, U, D], down [E, D, I]; got {types[:5]}")
    if ids.dtype not in ("i64", "i32"):
        raise TypeError(f"moe expert ids must be integers, got {ids}")
    for t in (ids, w):
        if not dims_equal(t.shape[0], x.shape[0]):
            raise TypeError(f"moe routing {t} disagrees with x {x} on the token dim")
    if not dims_equal(ids.shape[1], w.shape[1]):
        raise TypeError(f"moe expert ids {ids} and weights {w} disagree on k")
    e, u, d = up.shape
    i = down.shape[2]
    if not (dims_equal(down.shape[0], e) and dims_equal(d, x.shape[1]) and dims_equal(down.shape[1], x.shape[1])):
        raise TypeError(f"moe weights up {up} / down {down} do not fit x {x}")
    if not dims_equal(u, 2 * i if attrs["gated"] else i):
        raise TypeError(f"moe up rows {u} must be {'2x' if attrs['gated'] else ''}the down width {i}")
    if len(types) == 7:
        ub, db = types[5], types[6]
        if ub.shape != (e, u) or db.shape != (e, d):
            raise TypeError(f"moe biases must be [{e}, {u}] and [{e}, {d}], got {ub} and {db}")
    _same_dtype([x, w, up, down] + list(types[5:]))
    return [x]


@register_op("rope", num_operands=3)
def _rope(types, attrs, ctx):
    """Rotary embedding, rotate-half form: x·cos + rotate_half(x)·sin over the last axis.

    rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2]); cos and sin broadcast to x."""
    x, cos, sin = types
    if not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        raise TypeError(f"rope needs an even, static last dim, got {x}")
    shape = broadcast_shapes(broadcast_shapes(x.shape, cos.shape), sin.shape)
    if len(shape) != x.rank or not all(dims_equal(a, b) for a, b in zip(shape, x.shape)):
        raise TypeError(f"rope cos/sin {cos}, {sin} must broadcast to x {x}")
    return [TensorType(x.shape, _same_dtype(types))]


@register_op("glu", num_operands=2, attrs={"activation": "str"})
def _glu(types, attrs, ctx):
    """Gated linear unit: act(gate) * up, act in silu | gelu | gelu_tanh (SwiGLU, GeGLU)."""
    if attrs["activation"] not in ("silu", "gelu", "gelu_tanh"):
        raise TypeError(f"glu activation must be silu, gelu or gelu_tanh, got {attrs['activation']!r}")
    return _binary(types, attrs, ctx)


ELEMENTWISE_OPS = frozenset(UNARY_OPS + BINARY_OPS + ("gelu", "cast", "constant", "glu", "rope"))


# --------------------------------------------------------------------------- quantized weights
# Layout and meaning: ir/quant.py. Codes u8 [N, K/2] (4-bit, two per byte) or i8/u8 [N, K];
# scales (and optional mins) f32/f16 [N, K / group_size]; w = scale * code (+ min), or
# scale * codebook[code] (+ min) with the optional attribute codebook (16 int8 values, 4-bit
# unsigned codes).

QUANT_ATTRS = {"bits": "int", "group_size": "int", "signed": "bool"}
QUANT_OPTIONAL = {"codebook": "ints"}


def _quant_weight(types: list[TensorType], attrs: dict[str, Any], what: str) -> tuple:
    """Checks codes/scales[/mins] of a quantized [N, K] weight; returns (N, K)."""
    bits, group, signed = attrs["bits"], attrs["group_size"], attrs["signed"]
    if bits not in (4, 5, 6, 8):
        raise TypeError(f"{what} bits must be 4, 5, 6 or 8, got {bits}")
    if group <= 0 or group % 2:
        raise TypeError(f"{what} group_size must be a positive even number, got {group}")
    book = attrs.get("codebook")
    if book is not None and (bits != 4 or signed or len(book) != 16 or not all(-128 <= v <= 127 for v in book)):
        raise TypeError(f"{what} codebook must be 16 int8 values indexed by unsigned 4-bit codes, "
                        f"got {len(book)} values for {bits}-bit {'signed' if signed else 'unsigned'} codes")
    codes, scales = types[0], types[1]
    want = "u8" if bits == 4 or not signed else "i8"
    if codes.rank != 2 or codes.dtype != want:
        raise TypeError(f"{what} {bits}-bit {'signed' if signed else 'unsigned'} codes must be {want}[N, C], got {codes}")
    if scales.rank != 2 or scales.dtype not in ("f32", "f16") or not dims_equal(scales.shape[0], codes.shape[0]):
        raise TypeError(f"{what} scales must be f32/f16 [{codes.shape[0]}, K/{group}], got {scales}")
    k = scales.shape[1] * group
    cols = k // 2 if bits == 4 else k
    if not dims_equal(codes.shape[1], cols):
        raise TypeError(f"{what} codes {codes} do not match scales {scales} at group_size {group} "
                        f"(expected {cols} code columns)")
    if len(types) == 3 and types[2] != scales:
        raise TypeError(f"{what} mins must have the scales' type {scales}, got {types[2]}")
    return codes.shape[0], normalize_dim(k)


@register_op("quantized_linear", min_operands=3, attrs=QUANT_ATTRS, optional_attrs=QUANT_OPTIONAL)
def _quantized_linear(types, attrs, ctx):
    """x [..., K] · dequantize(codes, scales[, mins])ᵀ -> [..., N]; the weight is [N, K] as in linear."""
    if len(types) not in (3, 4):
        raise TypeError(f"quantized_linear takes x, codes, scales and optional mins, got {len(types)} operands")
    x = types[0]
    if x.dtype not in ("f32", "f16", "bf16"):
        raise TypeError(f"quantized_linear input must be a float tensor, got {x}")
    n, k = _quant_weight(types[1:], attrs, "quantized_linear")
    if x.rank < 1 or not dims_equal(x.shape[-1], k):
        raise TypeError(f"quantized_linear input has K={x.shape[-1] if x.rank else None} but the weight has K={k}")
    return [TensorType(x.shape[:-1] + (n,), x.dtype)]


@register_op("quantized_embedding", min_operands=3, attrs=QUANT_ATTRS, optional_attrs=QUANT_OPTIONAL)
def _quantized_embedding(types, attrs, ctx):
    """Row gather from a quantized table [V, D]: ids [...] (integer) -> f32 [..., D]."""
    if len(types) not in (3, 4):
        raise TypeError(f"quantized_embedding takes ids, codes, scales and optional mins, got {len(types)} operands")
    ids = types[0]
    if ids.dtype not in ("i64", "i32"):
        raise TypeError(f"quantized_embedding ids must be i64 or i32, got {ids.dtype}")
    _, d = _quant_weight(types[1:], attrs, "quantized_embedding")
    return [TensorType(ids.shape + (d,), "f32")]


from . import recurrent as _recurrent  # noqa: E402,F401  (registers the recurrent-state ops)
