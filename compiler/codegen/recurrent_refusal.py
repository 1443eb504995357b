"""One refusal for the targets without recurrent-state kernels (cuda, rocm, metal): the model's
state ops are named before anything is built, and the user is sent to the cpu target."""

from __future__ import annotations

from ..ir import Module
from ..ir.recurrent import STATEFUL_OPS
from .registry import TargetError


def refuse_recurrent_state(module: Module, target: str) -> None:
    stateful = sorted({op.kind for op in module.functions["forward"].ops if op.kind in STATEFUL_OPS})
    if stateful:
        raise TargetError(f"{target}: the model keeps recurrent state ({', '.join(stateful)}: short convolutions / "
                          f"linear-attention scans); the {target} target has no kernels for these ops yet, "
                          f"compile it for --target cpu")
