"""Builder: appends ops to a block, naming results and inferring their types from the registry."""

from __future__ import annotations

import re
from typing import Any, Optional

from .core import Block, Module, Op, Value
from .ops import OPS
from .types import TensorType


class InferContext:
    """What an inference rule may look at besides operand types: the module and the op itself."""

    def __init__(self, module: Optional[Module] = None, op: Optional[Op] = None):
        self.module = module
        self.op = op


def infer_types(op: Op, module: Optional[Module]) -> list[TensorType]:
    opdef = OPS.get(op.kind)
    if opdef is None:
        raise TypeError(f"unknown op kind {op.kind!r}")
    return opdef.infer([v.type for v in op.operands], op.attrs, InferContext(module, op))


class NameAllocator:
    """Hands out unique SSA names, keeping a preferred name when it is free."""

    def __init__(self):
        self.used: set[str] = set()
        self.counter = 0

    def take(self, hint: Optional[str] = None) -> str:
        if hint:
            base = re.sub(r"[^A-Za-z0-9_.]", "_", hint)
            if base not in self.used:
                self.used.add(base)
                return base
            i = 1
            while f"{base}_{i}" in self.used:
                i += 1
            name = f"{base}_{i}"
        else:
            while str(self.counter) in self.used:
                self.counter += 1
            name = str(self.counter)
        self.used.add(name)
        return name

    def reserve_block(self, block: Block) -> None:
        for v in block.args:
            self.used.add(v.name)
        for op in block.ops:
            for r in op.results:
                self.used.add(r.name)


class Builder:
    """Appends ops to ``block``; each op's result types come from its inference rule."""

    def __init__(self, module: Optional[Module] = None, block: Optional[Block] = None):
        self.module = module
        self.block = block if block is not None else Block()
        self.names = NameAllocator()
        self.names.reserve_block(self.block)

    def arg(self, name: str, type: TensorType) -> Value:
        v = Value(self.names.take(name), type)
        self.block.args.append(v)
        return v

    def create(self, kind: str, operands: list[Value], attrs: Optional[dict[str, Any]] = None,
               hint: Optional[str] = None, region: Optional[Block] = None) -> Op:
        """Build an op (types inferred) without inserting it; ``hint`` names its results."""
        op = Op(kind, operands, attrs or {}, [], region)
        types = infer_types(op, self.module)
        names = [self.names.take(hint if i == 0 else f"{hint}_{i}") for i in range(len(types))] \
            if hint else [self.names.take() for _ in types]
        op.results = [Value(n, t, op) for n, t in zip(names, types)]
        return op

    def op(self, kind: str, *operands: Value, hint: Optional[str] = None,
           region: Optional[Block] = None, **attrs: Any) -> Value:
        """Append an op with one result and return that result."""
        op = self.create(kind, list(operands), attrs, hint, region)
        self.block.ops.append(op)
        return op.result

    def op_multi(self, kind: str, operands: list[Value], attrs: dict[str, Any],
                 hint: Optional[str] = None, region: Optional[Block] = None) -> list[Value]:
        op = self.create(kind, operands, attrs, hint, region)
        self.block.ops.append(op)
        return op.results

    def ret(self, *values: Value) -> None:
        self.block.results = list(values)
