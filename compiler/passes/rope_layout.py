"""Apply RoPE in the layout the projection produced, so the transposes around it cancel.

HF attention code views the q/k projection as [B, T, H, D], transposes it to [B, H, T, D],
applies RoPE there, and llmc's attention boundary transposes it back. RoPE rotates within
the last dim only, so it commutes with any permute that leaves the last dim in place:

    rope(permute(x, P), cos, sin)  →  permute(rope(x, permute(cos, P⁻¹), permute(sin, P⁻¹)), P)

After this rewrite canonicalize's permute-chain rule removes permute(permute(., P), P⁻¹),
and CSE merges the (tiny) permuted cos/sin tables all layers share. On SmolLM2 this removes
two transpose kernels per layer and lets RoPE read and write contiguous rows.
"""

from .registry import register_pass
from .rewrite import P, Rewrite, RewritePass, Var, use_counts

x, cos, sin = Var("x"), Var("cos"), Var("sin")


def _keeps_last_dim(perm) -> bool:
    return perm[-1] == len(perm) - 1


def _rope_before_permute(m, builder):
    permute = m["permute"]
    perm = list(permute.attrs["perm"])
    if use_counts(builder.block).get(id(permute.result), 0) != 1:
        return None  # the transposed x is needed anyway: moving the permute gains nothing
    rank = len(perm)
    if len(m["cos"].type.shape) != rank or len(m["sin"].type.shape) != rank:
        return None  # tables broadcast by rank: leave them (the type rule would need reshapes)
    inverse = [perm.index(i) for i in range(rank)]
    table_cos = builder.op("permute", m["cos"], perm=inverse)
    table_sin = builder.op("permute", m["sin"], perm=inverse)
    rotated = builder.op("rope", m["x"], table_cos, table_sin, hint="rope")
    return builder.op("permute", rotated, perm=perm)


RULES = [
    Rewrite("rope-through-permute",
            P("rope", P("permute", x, name="permute", perm=_keeps_last_dim), cos, sin), _rope_before_permute),
]


@register_pass
class RopeLayout(RewritePass):
    """Move a permute that keeps the last dim from before a rope op to after it (permuting the
    cos/sin tables back), so canonicalize can cancel it against the permute that follows.

    Requires: rope ops (recognize-rope). Guarantees: no rope reads a single-use, last-dim-keeping
    permute."""

    name = "rope-layout"
    requires = ("rope-recognized",)
    guarantees = ("rope-in-projection-layout",)

    rewrites = RULES
