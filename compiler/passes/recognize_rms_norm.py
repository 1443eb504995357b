"""Recognize RMSNorm, as the frontend imports it, as one ``rms_norm`` op.

Kernels and fusion then see a single normalization instead of six elementwise and reduction
ops, and the code generators can emit their tuned RMSNorm for it.
"""

from ..ir.types import dims_equal
from .registry import register_pass
from .rewrite import Const, P, Rewrite, Var, RewritePass

x, w = Var("x"), Var("w")
# x * rsqrt(mean(x², last axis, keepdim) + eps); the structured operand comes first so that x is
# bound by pow(x, 2) before the plain factor is matched (patterns do not backtrack across operands).
NORMED = P("mul", P("rsqrt", P("add", P("mean", P("pow", x, Const(value=2.0)), name="mean", keepdim=True),
                               Const("eps"))), x)


def _rms_norm(m, builder):
    """``rms_norm(x, w)`` when the mean runs over x's last axis and w is [D]; else decline."""
    xv, wv, mean = m["x"], m["w"], m["mean"]
    rank = xv.type.rank
    if rank == 0 or {a % rank for a in mean.attrs["axes"]} != {rank - 1}:
        return None
    if wv.type.rank != 1 or not dims_equal(wv.type.shape[0], xv.type.shape[-1]):
        return None
    if not m.root.result.type.same_as(xv.type):  # the weight must not broadcast x to a larger shape
        return None
    return builder.op("rms_norm", xv, wv, hint="rms_norm", eps=float(m["eps"]),
                      weight_offset=float(m.consts.get("offset", 0.0)))


RULES = [
    # Gemma: the weight factor is (w + offset), with offset a constant (1.0 in practice). Tried
    # first, or the plain rule would take the add as the weight.
    Rewrite("rms-norm-offset", P("mul", NORMED, P("add", w, Const("offset"))), _rms_norm),
    Rewrite("rms-norm", P("mul", NORMED, w), _rms_norm),
]


@register_pass
class RecognizeRmsNorm(RewritePass):
    """Replace w * (x * rsqrt(mean(x², last axis) + eps)) by rms_norm(x, w) {eps, weight_offset}.

    Also matches Gemma's (w + c) weight factor (weight_offset = c) and either operand order of
    each mul and add. Declines when the mean is not over the last axis or lacks keepdim, or when
    w is not [D]. Requires: verified IR. Guarantees: every such RMSNorm is an rms_norm op."""

    name = "recognize-rms-norm"
    guarantees = ("rms_norm-recognized",)

    rewrites = RULES
