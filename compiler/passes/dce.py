"""Dead-code elimination."""

from ..ir import Function, Module
from .base import FunctionPass
from .registry import register_pass
from .rewrite import remove_dead_ops


@register_pass
class DeadCodeElimination(FunctionPass):
    """Remove ops whose results nobody uses (ops with effects, like attention's KV writes, stay).

    Requires: nothing. Guarantees: every remaining pure op's result is used."""

    name = "dce"
    guarantees = ("no-dead-ops",)

    def run_on_function(self, fn: Function, module: Module) -> None:
        remove_dead_ops(fn.body)
