"""Graph-editing helpers and the declarative pattern-rewrite facility.

A pattern describes a sub-graph by op kinds, attributes and operand structure; variables
bind values (a variable used twice must bind the same value). A rewrite is a pattern plus a
pure replacement function ``(match, builder) -> Value | None``: it builds the replacement
with the builder (inserted just before the matched root) and returns the value that takes
the root's place, or None to decline. The driver replaces uses and leaves dead ops to DCE.

    x, eps = Var("x"), Const("eps")
    RMS = P("mul", x, P("rsqrt", P("add", P("mean", P("pow", x, Const(value=2.0))), eps)))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..ir import Block, Builder, Function, Module, Op, Value
from ..ir.builder import NameAllocator
from .base import FunctionPass


# ---------------------------------------------------------------------- graph editing


def replace_all_uses(block: Block, old: Value, new: Value) -> int:
    """Make every op of ``block`` and its results read ``new`` where they read ``old``."""
    count = 0
    for op in block.ops:
        for i, v in enumerate(op.operands):
            if v is old:
                op.operands[i] = new
                count += 1
    for i, v in enumerate(block.results):
        if v is old:
            block.results[i] = new
            count += 1
    return count


def remove_dead_ops(block: Block) -> int:
    """Drop ops none of whose results is used (ops with effects stay). Returns how many."""
    from ..ir.ops import OPS

    live: set[int] = {id(v) for v in block.results}
    kept: list[Op] = []
    removed = 0
    for op in reversed(block.ops):
        opdef = OPS.get(op.kind)
        if (opdef is not None and opdef.has_effects) or any(id(r) in live for r in op.results):
            kept.append(op)
            live.update(id(v) for v in op.operands)
        else:
            removed += 1
    block.ops[:] = reversed(kept)
    return removed


def use_counts(block: Block) -> dict[int, int]:
    counts: dict[int, int] = {}
    for op in block.ops:
        for v in op.operands:
            counts[id(v)] = counts.get(id(v), 0) + 1
    for v in block.results:
        counts[id(v)] = counts.get(id(v), 0) + 1
    return counts


class InsertionBuilder(Builder):
    """A Builder whose ops go into ``block`` at a position rather than at its end."""

    def __init__(self, module: Optional[Module], block: Block, names: NameAllocator, index: int):
        self.module, self.block, self.names, self.index = module, block, names, index

    def op(self, kind, *operands, hint=None, region=None, **attrs) -> Value:
        op = self.create(kind, list(operands), attrs, hint, region)
        self.block.ops.insert(self.index, op)
        self.index += 1
        return op.result


# ---------------------------------------------------------------------- patterns


class Pattern:
    def match(self, value: Value, m: "Match") -> bool:
        raise NotImplementedError


@dataclass
class Match:
    """What a pattern bound: variables to values, named sub-patterns to their ops."""

    values: dict[str, Value] = field(default_factory=dict)
    ops: dict[str, Op] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    root: Optional[Op] = None

    def __getitem__(self, name: str):
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            return self.consts[name]
        return self.ops[name]

    def copy(self) -> "Match":
        return Match(dict(self.values), dict(self.ops), dict(self.consts), self.root)


class Var(Pattern):
    """Matches any value (optionally only of a given rank); the same name binds the same value."""

    def __init__(self, name: str, rank: Optional[int] = None):
        self.name, self.rank = name, rank

    def match(self, value: Value, m: Match) -> bool:
        if self.rank is not None and value.type.rank != self.rank:
            return False
        bound = m.values.get(self.name)
        if bound is not None:
            return bound is value
        m.values[self.name] = value
        return True


class Const(Pattern):
    """Matches a ``constant`` op, optionally of a given value; binds its value to ``name``."""

    def __init__(self, name: Optional[str] = None, value: Optional[float] = None):
        self.name, self.value = name, value

    def match(self, value: Value, m: Match) -> bool:
        op = value.producer
        if op is None or op.kind != "constant":
            return False
        if self.value is not None and float(op.attrs["value"]) != float(self.value):
            return False
        if self.name:
            if self.name in m.consts and m.consts[self.name] != op.attrs["value"]:
                return False
            m.consts[self.name] = op.attrs["value"]
        return True


class P(Pattern):
    """Matches an op of ``kind`` whose operands match ``operands`` (in order, or either order
    for commutative binary ops) and whose attributes satisfy ``attrs`` (a value to equal, or a
    predicate). ``name`` records the matched op in the Match."""

    COMMUTATIVE = {"add", "mul", "maximum", "minimum"}

    def __init__(self, kind: str, *operands: Pattern, name: Optional[str] = None,
                 **attrs: Union[Any, Callable[[Any], bool]]):
        self.kind, self.operands, self.name, self.attrs = kind, operands, name, attrs

    def _attrs_ok(self, op: Op) -> bool:
        for key, want in self.attrs.items():
            have = op.attrs.get(key)
            if callable(want):
                if not want(have):
                    return False
            elif have != want:
                return False
        return True

    def match(self, value: Value, m: Match) -> bool:
        op = value.producer
        if op is None or op.kind != self.kind or len(op.operands) != len(self.operands) or not self._attrs_ok(op):
            return False
        orders = [op.operands]
        if self.kind in self.COMMUTATIVE and len(op.operands) == 2:
            orders.append(op.operands[::-1])
        for operands in orders:
            trial = m.copy()
            if all(p.match(v, trial) for p, v in zip(self.operands, operands)):
                if self.name:
                    trial.ops[self.name] = op
                m.values, m.ops, m.consts = trial.values, trial.ops, trial.consts
                return True
        return False


def match(pattern: Pattern, value: Value) -> Optional[Match]:
    m = Match()
    if pattern.match(value, m):
        m.root = value.producer
        return m
    return None


@dataclass
class Rewrite:
    """A named pattern and its pure replacement function."""

    name: str
    pattern: Pattern
    replace: Callable[[Match, Builder], Optional[Value]]


def apply_rewrites(fn: Function, module: Module, rewrites: list[Rewrite]) -> dict[str, int]:
    """Apply each rewrite wherever it matches a single-result op of ``fn``, in program order,
    until nothing matches. Returns how often each rewrite fired."""
    names = NameAllocator()
    names.reserve_block(fn.body)
    fired = {r.name: 0 for r in rewrites}
    changed = True
    while changed:
        changed = False
        i = 0
        while i < len(fn.body.ops):
            op = fn.body.ops[i]
            if len(op.results) == 1 and op.region is None:
                for rw in rewrites:
                    m = match(rw.pattern, op.result)
                    if m is None:
                        continue
                    builder = InsertionBuilder(module, fn.body, names, i)
                    new = rw.replace(m, builder)
                    if new is None:
                        del fn.body.ops[i:builder.index]  # declined: drop anything it built
                        continue
                    if not new.type.same_as(op.result.type):
                        raise TypeError(f"rewrite {rw.name} replaced %{op.result.name}: {op.result.type} "
                                        f"with %{new.name}: {new.type}")
                    replace_all_uses(fn.body, op.result, new)
                    del fn.body.ops[builder.index]  # the old root, now unused
                    fired[rw.name] += 1
                    changed = True
                    i = builder.index - 1  # continue after the replacement
                    break
            i += 1
        remove_dead_ops(fn.body)
    return fired


class RewritePass(FunctionPass):
    """A pass that is nothing but a list of rewrites; ``fired`` counts each rule's firings."""

    rewrites: list[Rewrite] = []

    def __init__(self):
        self.fired: dict[str, int] = {}

    def run_on_function(self, fn: Function, module: Module) -> None:
        for rule, n in apply_rewrites(fn, module, self.rewrites).items():
            self.fired[rule] = self.fired.get(rule, 0) + n
