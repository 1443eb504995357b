"""Constant folding of scalar arithmetic."""

import torch

from ..ir import Function, Module, Op
from ..ir.interpreter import IMPLS, TORCH_DTYPES, _Frame
from ..ir.ops import ELEMENTWISE_OPS
from ..ir.builder import NameAllocator
from .base import FunctionPass
from .registry import register_pass
from .rewrite import InsertionBuilder, remove_dead_ops, replace_all_uses


def _evaluate(op: Op, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Run the op's reference meaning on constant inputs (the interpreter is the oracle)."""
    frame = _Frame(None, {})  # elementwise meanings read nothing of the frame but the op
    frame.op = op
    return IMPLS[op.kind](inputs, op.attrs, frame)


@register_pass
class ConstantFold(FunctionPass):
    """Replace elementwise ops on scalar constants by the constant they compute.

    Uses the reference interpreter's meaning of each op, so folding cannot change results.
    Requires: verified IR. Guarantees: no elementwise op has only constant operands."""

    name = "constant-fold"
    guarantees = ("constants-folded",)

    def run_on_function(self, fn: Function, module: Module) -> None:
        names = NameAllocator()
        names.reserve_block(fn.body)
        i = 0
        while i < len(fn.body.ops):
            op = fn.body.ops[i]
            if (op.kind in ELEMENTWISE_OPS and op.kind != "constant" and op.operands
                    and all(v.producer is not None and v.producer.kind == "constant" for v in op.operands)
                    and op.result.type.rank == 0):
                inputs = [torch.tensor(v.producer.attrs["value"], dtype=TORCH_DTYPES[v.type.dtype])
                          for v in op.operands]
                out = _evaluate(op, inputs)
                value = float(out) if out.is_floating_point() else int(out)
                builder = InsertionBuilder(module, fn.body, names, i)
                new = builder.op("constant", value=value, dtype=op.result.type.dtype)
                replace_all_uses(fn.body, op.result, new)
                del fn.body.ops[builder.index]
            i += 1
        remove_dead_ops(fn.body)
