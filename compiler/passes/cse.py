"""Common-subexpression elimination."""

from ..ir import Function, Module
from ..ir.ops import OPS
from ..ir.printer import format_attrs
from .base import FunctionPass
from .registry import register_pass
from .rewrite import remove_dead_ops


@register_pass
class CommonSubexpressionElimination(FunctionPass):
    """Merge ops that compute the same thing: same kind, operands, attributes and types.

    Reads of the same param, equal constants and repeated views collapse to one op. Ops with
    effects (attention writes the KV cache) and ops with regions are never merged.
    Requires: verified IR. Guarantees: no two pure ops compute the same value."""

    name = "cse"
    guarantees = ("no-common-subexpressions",)

    def run_on_function(self, fn: Function, module: Module) -> None:
        seen = {}
        replaced = {}
        for op in fn.body.ops:
            op.operands = [replaced.get(id(v), v) for v in op.operands]
            opdef = OPS.get(op.kind)
            if op.region is not None or opdef is None or opdef.has_effects:
                continue
            key = (op.kind, tuple(id(v) for v in op.operands), format_attrs(op.attrs),
                   tuple(str(r.type) for r in op.results))
            first = seen.get(key)
            if first is None:
                seen[key] = op
                continue
            for old, new in zip(op.results, first.results):
                replaced[id(old)] = new
        fn.body.results = [replaced.get(id(v), v) for v in fn.body.results]
        remove_dead_ops(fn.body)
