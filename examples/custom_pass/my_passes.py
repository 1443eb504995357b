"""An example of a pass written outside llmc: rewrite pow(x, 2) into mul(x, x).

Why a researcher might want it: a multiply is cheaper than a general power on every target,
and RMSNorm computes x² on every token of every layer. Copy this file to start your own.
"""

from llmc.compiler.ir import Function, Module
from llmc.compiler.passes import Const, FunctionPass, P, Rewrite, Var, apply_rewrites


def _square_to_mul(match, builder):
    """Pure replacement: build mul(x, x), which has pow's type exactly."""
    x = match["x"]
    return builder.op("mul", x, x)


class SquareToMul(FunctionPass):
    """Rewrite pow(x, 2.0) into mul(x, x).

    Requires: verified IR. Guarantees: no pow by the constant 2 remains."""

    name = "square-to-mul"
    guarantees = ("no-pow-2",)
    rewrites = [Rewrite("square-to-mul", P("pow", Var("x"), Const(value=2.0)), _square_to_mul)]

    def run_on_function(self, fn: Function, module: Module) -> None:
        self.fired = apply_rewrites(fn, module, self.rewrites)["square-to-mul"]


class BreaksTheIR(FunctionPass):
    """A deliberately wrong pass (used by the tests): drops the first op that has users."""

    name = "breaks-the-ir"

    def run_on_function(self, fn: Function, module: Module) -> None:
        used = {id(v) for op in fn.body.ops for v in op.operands}
        for i, op in enumerate(fn.body.ops):
            if any(id(r) in used for r in op.results):
                del fn.body.ops[i]
                return


def raises(module: Module) -> Module:
    """A pass written as a plain function that fails (used by the tests)."""
    raise RuntimeError("this pass always fails")
