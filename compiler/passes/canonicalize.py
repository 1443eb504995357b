"""Canonicalization: remove ops that do nothing and collapse chains of views.

Each rule is a pattern plus a pure replacement. Types never change: a rule only fires when the
replacement has exactly the root's type.
"""

from ..ir.types import dims_equal
from .registry import register_pass
from .rewrite import Const, P, Rewrite, Var, RewritePass

x = Var("x")


def _same_type_as_root(m, builder):
    """Replace the root by x when x already has the root's type (no-op view or cast)."""
    value = m["x"]
    return value if value.type.same_as(m.root.result.type) else None


def _reshape_chain(m, builder):
    return builder.op("reshape", m["x"], shape=list(m.root.attrs["shape"]))


def _permute_chain(m, builder):
    inner, outer = m["inner"].attrs["perm"], m.root.attrs["perm"]
    composed = [inner[p] for p in outer]
    if composed == list(range(len(composed))):
        return m["x"]
    return builder.op("permute", m["x"], perm=composed)


def _full_slice(m, builder):
    op = m.root
    size = m["x"].type.shape[op.attrs["axis"]]
    if op.attrs["step"] == 1 and dims_equal(op.attrs["start"], 0) and dims_equal(op.attrs["end"], size):
        return m["x"]
    return None


def _is_empty(value) -> bool:
    return any(dims_equal(d, 0) for d in value.type.shape)


def _concat_drop_empty(m, builder):
    """concat(a, b) where one side has no elements (partial-rotary models concatenate an empty
    pass-through slice) is the other side."""
    a, b = m["x"], m["y"]
    for keep, drop in ((a, b), (b, a)):
        if _is_empty(drop) and keep.type.same_as(m.root.result.type):
            return keep
    return None


RULES = [
    Rewrite("noop-reshape", P("reshape", x), _same_type_as_root),
    Rewrite("noop-cast", P("cast", x), _same_type_as_root),
    Rewrite("noop-expand", P("expand", x), _same_type_as_root),
    Rewrite("noop-permute", P("permute", x, perm=lambda p: p == sorted(p)), _same_type_as_root),
    Rewrite("noop-slice", P("slice", x), _full_slice),
    Rewrite("noop-concat", P("concat", x), _same_type_as_root),
    Rewrite("mul-by-one", P("mul", x, Const(value=1.0)), _same_type_as_root),
    Rewrite("div-by-one", P("div", x, Const(value=1.0)), _same_type_as_root),
    Rewrite("concat-drop-empty", P("concat", x, Var("y")), _concat_drop_empty),
    Rewrite("reshape-chain", P("reshape", P("reshape", x)), _reshape_chain),
    Rewrite("permute-chain", P("permute", P("permute", x, name="inner")), _permute_chain),
]


@register_pass
class Canonicalize(RewritePass):
    """Remove no-op reshapes/permutes/expands/slices/concats (and empty concat operands), casts
    to the same dtype and multiplications by one; fold reshape-of-reshape and permute-of-permute chains.

    Requires: verified IR. Guarantees: no no-op views or casts remain."""

    name = "canonicalize"
    guarantees = ("canonical",)

    rewrites = RULES
