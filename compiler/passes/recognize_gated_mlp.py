"""Recognize the gated MLP product act(gate) * up (SwiGLU, GeGLU) as one ``glu`` op.

As one op the activation is applied on the fly, so act(gate) is never written to memory.
"""

from .registry import register_pass
from .rewrite import P, Rewrite, Var, RewritePass, use_counts

g, u = Var("gate"), Var("up")
GELU_NAMES = {"none": "gelu", "tanh": "gelu_tanh"}


def _glu(m, builder):
    """``glu(gate, up)`` when act(gate) feeds only this mul; else decline (act(gate) would still
    have to be computed for its other uses, so fusing gains nothing)."""
    act = m["act"]
    if use_counts(builder.block).get(id(act.result), 0) != 1:
        return None
    name = "silu" if act.kind == "silu" else GELU_NAMES.get(act.attrs["approximate"])
    if name is None:
        return None
    return builder.op("glu", m["gate"], m["up"], hint="glu", activation=name)


RULES = [
    Rewrite("glu-silu", P("mul", P("silu", g, name="act"), u), _glu),
    Rewrite("glu-gelu", P("mul", P("gelu", g, name="act"), u), _glu),
]


@register_pass
class RecognizeGatedMlp(RewritePass):
    """Replace act(gate) * up by glu(gate, up) {activation}, for act silu, gelu or gelu (tanh).

    Either operand order of the mul matches; only fires when act(gate) has no other use.
    Requires: verified IR. Guarantees: every single-use gated product is a glu op."""

    name = "recognize-gated-mlp"
    guarantees = ("glu-recognized",)

    rewrites = RULES
