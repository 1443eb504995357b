"""Verifier: checks the invariants of ``INVARIANTS.md`` and names the offending op and value.

Every problem found is reported (not only the first), each as one line that says where it
is (function, op, value) and what is wrong.
"""

from __future__ import annotations

from typing import Optional

from .builder import InferContext
from .core import Block, Function, Module, Op, Value
from .ops import OPS, check_attr
from .printer import format_op


class VerifyError(ValueError):
    def __init__(self, problems: list[str], where: str = ""):
        self.problems = problems
        head = f"IR verification failed{(' ' + where) if where else ''} ({len(problems)} problem"
        head += "s)" if len(problems) != 1 else ")"
        super().__init__(head + ":\n  " + "\n  ".join(problems))


def _describe(op: Op) -> str:
    return format_op(op)[0].rstrip(" {").strip()


def verify_op_local(op: Op, module: Optional[Module]) -> list[str]:
    """Problems with the op itself: kind, operand count, attributes, result types."""
    opdef = OPS.get(op.kind)
    if opdef is None:
        known = ", ".join(sorted(OPS))
        return [f"unknown op kind '{op.kind}' (known: {known})"]
    problems = []
    n = len(op.operands)
    if opdef.num_operands is not None and n != opdef.num_operands:
        problems.append(f"'{op.kind}' takes {opdef.num_operands} operands, got {n}")
    elif n < opdef.min_operands:
        problems.append(f"'{op.kind}' takes at least {opdef.min_operands} operands, got {n}")
    for key, kind in opdef.attrs.items():
        if key not in op.attrs:
            problems.append(f"'{op.kind}' is missing attribute '{key}' ({kind})")
        elif not check_attr(kind, op.attrs[key]):
            problems.append(f"'{op.kind}' attribute '{key}' must be {kind}, got {op.attrs[key]!r}")
    for key, value in op.attrs.items():
        if key not in opdef.attrs:
            if key not in opdef.optional_attrs:
                problems.append(f"'{op.kind}' has unknown attribute '{key}'")
            elif not check_attr(opdef.optional_attrs[key], value):
                problems.append(f"'{op.kind}' attribute '{key}' must be {opdef.optional_attrs[key]}, got {value!r}")
    if opdef.has_region != (op.region is not None):
        problems.append(f"'{op.kind}' {'needs' if opdef.has_region else 'cannot have'} a region")
    if problems:
        return problems
    try:
        inferred = opdef.infer([v.type for v in op.operands], op.attrs, InferContext(module, op))
    except TypeError as exc:
        return [f"type error: {exc}"]
    if len(inferred) != len(op.results):
        return [f"'{op.kind}' produces {len(inferred)} results, but {len(op.results)} are declared"]
    for r, t in zip(op.results, inferred):
        if not r.type.same_as(t):
            problems.append(f"result %{r.name} is declared {r.type} but '{op.kind}' gives {t}")
    return problems


def verify_block(block: Block, module: Optional[Module], where: str) -> list[str]:
    problems: list[str] = []
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(v: Value, what: str):
        if v.name in names:
            problems.append(f"{where}: value %{v.name} is defined twice ({names[v.name]} and {what})")
        names[v.name] = what
        defined.add(id(v))

    for a in block.args:
        define(a, "argument")
    for op in block.ops:
        desc = _describe(op)
        for v in op.operands:
            if id(v) not in defined:
                problems.append(f"{where}: op `{desc}` uses %{v.name} before its definition "
                                f"(or it is not defined in this block)")
        problems += [f"{where}: op `{desc}`: {p}" for p in verify_op_local(op, module)]
        if op.region is not None:
            problems += verify_block(op.region, module, f"{where} / region of %{op.results[0].name}"
                                     if op.results else f"{where} / region")
        for r in op.results:
            if r.producer is not op:
                problems.append(f"{where}: result %{r.name} of `{desc}` does not point back to its op")
            define(r, f"`{desc}`")
    problems += _check_pool_updates(block, where)
    for v in block.results:
        if id(v) not in defined:
            problems.append(f"{where}: returns %{v.name}, which is not defined in this block")
    if not block.results:
        problems.append(f"{where}: returns nothing")
    return problems


def _check_pool_updates(block: Block, where: str) -> list[str]:
    """KV pools are updated in place by code generators, so a pool value that a ``kv_append``
    consumed is dead: no later op reads it and the block does not return it (INVARIANTS.md)."""
    consumed: dict[int, str] = {}
    problems = []
    for op in block.ops:
        for v in op.operands:
            if id(v) in consumed:
                problems.append(f"{where}: op `{_describe(op)}` reads %{v.name} after {consumed[id(v)]} "
                                f"updated that KV pool; use the updated pool instead")
        if op.kind == "kv_append":
            for v in op.operands[:2]:
                consumed[id(v)] = f"`{_describe(op)}`"
        if op.kind in ("causal_conv1d_step", "gated_delta_rule_step"):  # state pools, likewise
            consumed[id(op.operands[0])] = f"`{_describe(op)}`"
    for v in block.results:
        if id(v) in consumed:
            problems.append(f"{where}: returns %{v.name}, a KV pool that {consumed[id(v)]} already updated")
    return problems


def verify_function(fn: Function, module: Optional[Module] = None) -> list[str]:
    return verify_block(fn.body, module, f"@{fn.name}")


def verify(module: Module, raise_on_error: bool = True) -> list[str]:
    """All problems in the module; raises ``VerifyError`` listing them unless told not to."""
    problems: list[str] = []
    if not module.functions:
        problems.append(f"module @{module.name} has no functions")
    for name, p in module.params.items():
        if name != p.name:
            problems.append(f"param table key {name!r} names param @{p.name}")
    for fn in module.functions.values():
        problems += verify_function(fn, module)
    if problems and raise_on_error:
        raise VerifyError(problems, f"in module @{module.name}")
    return problems
