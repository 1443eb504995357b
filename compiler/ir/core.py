"""The IR's data structures: Module → Function → Block → Op, with SSA Values.

A Block is a straight-line list of ops with typed arguments and results. A Function's body
is a Block; a ``fused`` op carries a Block too (its region), so one verifier, printer and
interpreter serve both. See ``INVARIANTS.md`` beside this file for what must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .types import TensorType


class Value:
    """An SSA value: defined once (block argument or op result), used any number of times."""

    __slots__ = ("name", "type", "producer")

    def __init__(self, name: str, type: TensorType, producer: Optional["Op"] = None):
        self.name = name
        self.type = type
        self.producer = producer

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Op:
    """One operation: a kind (registered in ``ops.py``), operands, attributes, results."""

    __slots__ = ("kind", "operands", "attrs", "results", "region")

    def __init__(
        self,
        kind: str,
        operands: list[Value],
        attrs: dict[str, Any],
        results: list[Value],
        region: Optional["Block"] = None,
    ):
        self.kind = kind
        self.operands = list(operands)
        self.attrs = dict(attrs)
        self.results = list(results)
        self.region = region
        for r in self.results:
            r.producer = self

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"op {self.kind} has {len(self.results)} results, not one")
        return self.results[0]

    def __repr__(self) -> str:
        outs = ", ".join(f"%{r.name}" for r in self.results)
        ins = ", ".join(f"%{v.name}" for v in self.operands)
        return f"<{outs} = {self.kind}({ins})>"


@dataclass
class Block:
    """Straight-line SSA code: arguments, ops in execution order, returned values."""

    args: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    results: list[Value] = field(default_factory=list)

    def walk(self) -> Iterator[Op]:
        """Every op, nested regions included, in program order."""
        for op in self.ops:
            yield op
            if op.region is not None:
                yield from op.region.walk()

    def users(self) -> dict[Value, list[Op]]:
        """For each value, the ops of this block (not nested regions) that read it."""
        uses: dict[Value, list[Op]] = {}
        for op in self.ops:
            for v in op.operands:
                uses.setdefault(v, []).append(op)
        return uses


@dataclass
class Function:
    name: str
    body: Block

    @property
    def args(self) -> list[Value]:
        return self.body.args

    @property
    def ops(self) -> list[Op]:
        return self.body.ops

    @property
    def results(self) -> list[Value]:
        return self.body.results


@dataclass
class Param:
    """An entry of the parameter table: a named weight the functions read via ``param`` ops."""

    name: str
    type: TensorType
    origin: str = "parameter"  # parameter | buffer | constant | gguf:<tensor name> | ...


@dataclass
class Module:
    name: str
    functions: dict[str, Function] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def add_function(self, fn: Function) -> Function:
        if fn.name in self.functions:
            raise ValueError(f"function @{fn.name} already exists in module @{self.name}")
        self.functions[fn.name] = fn
        return fn

    def add_param(self, name: str, type: TensorType, origin: str = "parameter") -> Param:
        if name in self.params:
            raise ValueError(f"param @{name} already exists in module @{self.name}")
        p = Param(name, type, origin)
        self.params[name] = p
        return p
