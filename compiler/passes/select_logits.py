"""Compute the LM head only for the rows that produce logits (the step interface's logits_index).

The LM head is a fifth of SmolLM2's weights; running it over every prompt token would waste
most of a prefill. This pass gives ``@forward`` a third argument ``logits_index: i64[B]`` and
gathers those rows of the final hidden state before the LM head, so the result is
``f32[B, vocab]``. Code generators run it before the -O pipeline.
"""

from __future__ import annotations

from ..ir import Module, TensorType, Value, symbol
from ..ir.builder import NameAllocator, infer_types
from ..ir.ops import ELEMENTWISE_OPS
from .base import Pass
from .registry import register_pass
from .rewrite import InsertionBuilder

ROWS_SYMBOL = "B"


def _substitute(value, old, new):
    if isinstance(value, list):
        return [_substitute(v, old, new) for v in value]
    if hasattr(value, "xreplace"):
        return value.xreplace({old: new})
    return value


@register_pass
class SelectLogits(Pass):
    """Add ``logits_index: i64[B]`` to @forward and run the LM head on those rows only.

    Requires: @forward(input_ids, positions) returning logits [T, vocab] computed by a final
    `linear` followed only by reshapes and elementwise ops. Guarantees: logits are [B, vocab]."""

    name = "select-logits"
    guarantees = ("logits-selected",)

    def run(self, module: Module) -> Module:
        fn = module.functions["forward"]
        if any(a.name == "logits_index" for a in fn.args):
            return module
        tokens, rows = symbol("T"), symbol(ROWS_SYMBOL)
        chain, value = [], fn.results[0]
        while value.producer is not None and value.producer.kind != "linear":
            op = value.producer
            tensor_operands = [v for v in op.operands if v.producer is None or v.producer.kind != "constant"]
            if (op.kind not in ELEMENTWISE_OPS and op.kind != "reshape") or len(tensor_operands) != 1:
                raise ValueError(f"select-logits: cannot see through %{value.name} = {op.kind} to the LM head")
            chain.append(op)
            value = tensor_operands[0]
        head = value.producer
        if head is None:
            raise ValueError("select-logits: the logits do not come from a linear (LM head)")
        x = head.operands[0]
        if x.type.rank < 2 or x.type.shape[-2] != tokens or any(d != 1 for d in x.type.shape[:-2]):
            raise ValueError(f"select-logits: LM head input {x.type} is not [..., T, hidden]")
        index = Value("logits_index", TensorType((rows,), "i64"))
        fn.args.append(index)
        names = NameAllocator()
        names.reserve_block(fn.body)
        b = InsertionBuilder(module, fn.body, names, fn.body.ops.index(head))
        hidden = x.type.shape[-1]
        flat = b.op("reshape", x, shape=[tokens, hidden], hint="final_hidden")
        picked = b.op("embedding", flat, index, hint="selected_hidden")  # row gather
        head.operands[0] = b.op("reshape", picked, shape=list(x.type.shape[:-2]) + [rows, hidden])
        for op in [head] + list(reversed(chain)):
            op.attrs = {k: _substitute(v, tokens, rows) for k, v in op.attrs.items()}
            for r, t in zip(op.results, infer_types(op, module)):
                r.type = t
        return module
