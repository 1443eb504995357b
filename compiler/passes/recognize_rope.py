"""Recognize rotary position embeddings (rotate-half form) as one ``rope`` op.

The imported form slices, negates and concatenates x only to multiply it by sin; as one op a
kernel applies the rotation in registers without materializing rotate_half(x).
"""

from ..ir.types import dims_equal
from .registry import register_pass
from .rewrite import P, Rewrite, Var, RewritePass

x = Var("x")
# x·cos + concat(-x[..., D/2:], x[..., :D/2])·sin. The rotated operand comes first so that x is
# bound by the slices before x·cos is matched (patterns do not backtrack across operands).
ROPE = P("add",
         P("mul", P("concat", P("neg", P("slice", x, name="hi")), P("slice", x, name="lo"), name="cat"),
           Var("sin")),
         P("mul", x, Var("cos")))


def _rope(m, builder):
    """``rope(x, cos, sin)`` when the slices are x's two halves along its last axis and cos, sin
    broadcast to x; else decline."""
    xv = m["x"]
    rank = xv.type.rank
    if rank == 0 or not isinstance(xv.type.shape[-1], int) or xv.type.shape[-1] % 2:
        return None
    d = xv.type.shape[-1]

    def last_axis(op):
        return op.attrs["axis"] % rank == rank - 1

    def is_slice(op, start, end):
        a = op.attrs
        return last_axis(op) and a["step"] == 1 and dims_equal(a["start"], start) and dims_equal(a["end"], end)

    if not (last_axis(m["cat"]) and is_slice(m["hi"], d // 2, d) and is_slice(m["lo"], 0, d // 2)):
        return None
    if not m.root.result.type.same_as(xv.type):  # cos or sin would broadcast x to a larger shape
        return None
    return builder.op("rope", xv, m["cos"], m["sin"], hint="rope")


RULES = [Rewrite("rope", ROPE, _rope)]


@register_pass
class RecognizeRope(RewritePass):
    """Replace x·cos + rotate_half(x)·sin over x's last axis by rope(x, cos, sin).

    rotate_half(x) must be concat(neg(x[..., D/2:D]), x[..., 0:D/2]) along the last axis (given
    as -1 or rank-1), D static and even. Either operand order of the add and muls matches.
    Requires: verified IR. Guarantees: every such rotation is a rope op."""

    name = "recognize-rope"
    guarantees = ("rope-recognized",)

    rewrites = RULES
