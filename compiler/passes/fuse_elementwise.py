"""Group elementwise chains, matmul epilogues and norm prologues into ``fused`` regions.

One region is one future kernel. Groups are grown greedily in program order: each fusible op
joins (and may merge) the groups of its operands' producers when that keeps SSA order valid,
else starts a group of its own. Each group then becomes one ``fused`` op placed where its
last member was.
"""

from __future__ import annotations

from ..ir import Block, Function, Module, Op, Value
from ..ir.ops import ELEMENTWISE_OPS
from .base import FunctionPass
from .registry import register_pass

ANCHORS = frozenset({"linear", "matmul", "quantized_linear"})  # may start a group, never join one
NORMS = frozenset({"rms_norm"})  # may start a group or join an anchor-free one
MEMBERS = (ELEMENTWISE_OPS - {"constant"}) | ANCHORS | NORMS


class _Group:
    def __init__(self, first: Op):
        self.members = [first]


def _special(op: Op) -> bool:
    """Anchors and norms: a group (one kernel) holds at most one of them."""
    return op.kind in ANCHORS or op.kind in NORMS


def _can_merge(groups: list[_Group], x: Op, pos: dict[Op, int], users: dict[Value, list[Op]]) -> bool:
    """May ``groups`` and ``x`` become one group placed at ``x``?

    Kernel shape: at most one anchor or norm, and an anchor reads nothing computed in its own
    group (epilogues only, no matmul prologues). Order: every user outside the new group of a
    value the groups produce must come after ``x``, since the fused op will sit at ``x``."""
    members = {m for g in groups for m in g.members}
    if sum(_special(m) for m in members) + _special(x) > 1:
        return False
    for m in members:
        if m.kind in ANCHORS and any(v.producer in members for v in m.operands):
            return False
        for r in m.results:
            if any(u not in members and u is not x and pos[u] < pos[x] for u in users.get(r, ())):
                return False
    return True


def _form_groups(block: Block) -> list[_Group]:
    """Greedy grouping in program order (see the module docstring)."""
    pos = {op: i for i, op in enumerate(block.ops)}
    users = block.users()
    group_of: dict[Op, _Group] = {}
    groups: list[_Group] = []
    for x in block.ops:
        if x.kind not in MEMBERS:
            continue
        chosen: list[_Group] = []
        if x.kind not in ANCHORS:
            # an op feeding a norm stays out of matmul epilogues, so the norm can take it as its
            # prologue: add(h, o_proj(..)) + rms_norm become one region with both results
            feeds_norm = any(u.kind in NORMS for r in x.results for u in users.get(r, ()))
            candidates = []
            for v in x.operands:
                g = group_of.get(v.producer)
                if g is not None and g not in candidates and not (
                        feeds_norm and any(m.kind in ANCHORS for m in g.members)):
                    candidates.append(g)
            changed = True  # repeat: merging one group can make another legal
            while changed:
                changed = False
                for g in candidates:
                    if g not in chosen and _can_merge(chosen + [g], x, pos, users):
                        chosen.append(g)
                        changed = True
        if not chosen:
            group = _Group(x)
            groups.append(group)
        else:
            group = chosen[0]
            for g in chosen[1:]:
                group.members += g.members
                groups.remove(g)
            group.members = sorted(group.members, key=pos.__getitem__) + [x]
        for m in group.members:
            group_of[m] = group
    return [g for g in groups if len(g.members) > 1]


def _region_name(members: list[Op], taken: set[str]) -> str:
    """E.g. "fused_linear_add_3": up to four member kinds, then a number unique in the function."""
    stem = "fused_" + "_".join(list(dict.fromkeys(m.kind for m in members))[:4])
    i = len(taken)
    while f"{stem}_{i}" in taken:
        i += 1
    taken.add(f"{stem}_{i}")
    return f"{stem}_{i}"


def _build_fused(members: list[Op], outputs: list[Value], name: str) -> Op:
    """Clone ``members`` into a closed region; constants are cloned in, other outside
    operands become region arguments. Inner values keep their outer names (regions have
    their own scope), and the fused op's results take the names of the values they replace."""
    inner: dict[Value, Value] = {}
    args: list[Value] = []
    inputs: list[Value] = []
    ops: list[Op] = []

    def lookup(v: Value) -> Value:
        if v not in inner:
            p = v.producer
            if p is not None and p.kind == "constant":
                clone = Op("constant", [], dict(p.attrs), [Value(v.name, v.type)])
                ops.append(clone)
                inner[v] = clone.result
            else:
                inner[v] = Value(v.name, v.type)
                args.append(inner[v])
                inputs.append(v)
        return inner[v]

    for m in members:
        clone = Op(m.kind, [lookup(v) for v in m.operands], dict(m.attrs), [Value(r.name, r.type) for r in m.results])
        ops.append(clone)
        inner.update(zip(m.results, clone.results))
    region = Block(args, ops, [inner[v] for v in outputs])
    return Op("fused", inputs, {"name": name}, [Value(v.name, v.type) for v in outputs], region)


def fuse_function(fn: Function) -> int:
    """Fuse ``fn`` in place; returns the number of regions formed."""
    block = fn.body
    users = block.users()
    returned = set(block.results)
    taken = {op.attrs["name"] for op in block.ops if op.kind == "fused"}
    at_last: dict[Op, Op] = {}  # last member -> the fused op that replaces its group
    fused_members: set[Op] = set()
    replace: dict[Value, Value] = {}
    for group in _form_groups(block):
        members = set(group.members)
        outputs = [r for m in group.members for r in m.results
                   if r in returned or any(u not in members for u in users.get(r, ()))]
        if not outputs:  # all dead: leave it to DCE
            continue
        fused = _build_fused(group.members, outputs, _region_name(group.members, taken))
        at_last[group.members[-1]] = fused
        fused_members |= members
        replace.update(zip(outputs, fused.results))
    new_ops = []
    for op in block.ops:
        op = at_last.get(op, op)
        if op not in fused_members:
            op.operands = [replace.get(v, v) for v in op.operands]  # inputs may be other regions' outputs
            new_ops.append(op)
    # constants that only fed fused members now live (cloned) inside the regions
    cloned = {v.producer for m in fused_members for v in m.operands if v.producer and v.producer.kind == "constant"}
    still_used = {v for op in new_ops for v in op.operands} | set(block.results)
    block.ops[:] = [op for op in new_ops if op not in cloned or op.result in still_used]
    block.results[:] = [replace.get(v, v) for v in block.results]
    return len(at_last)


@register_pass
class FuseElementwise(FunctionPass):
    """Group elementwise chains, linear/matmul epilogues and rms_norm prologues into `fused` regions.

    Requires: verified IR (best after recognize-* and cleanup, so norms, rope and glu are single
    ops). Guarantees: each `fused` op holds >= 2 members: elementwise ops plus at most one
    linear/matmul (reading only region arguments) or one rms_norm; its region is closed
    (constants are cloned in); the function computes the same values in a valid SSA order."""

    name = "fuse-elementwise"
    guarantees = ("elementwise-fused",)

    def run_on_function(self, fn: Function, module: Module) -> None:
        fuse_function(fn)


def fusion_stats(fn: Function) -> dict:
    """What fusion left: regions, ops inside them (cloned constants excluded), top-level ops,
    and decoder layers (attention ops), so a caller can report regions per layer."""
    regions = [op for op in fn.ops if op.kind == "fused"]
    return {
        "regions": len(regions),
        "fused_ops": sum(1 for r in regions for op in r.region.walk() if op.kind != "constant"),
        "top_level_ops": len(fn.ops),
        "layers": sum(1 for op in fn.ops if op.kind == "attention"),
    }
