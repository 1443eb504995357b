"""The Relax pipeline of the cpu target: TVM's default one with a leaner virtual-machine program.

Why: a decode step's kernels take microseconds, and everything the VM does between them runs
on the calling thread while the other kernel threads wait. In the batched step, whose token
count is symbolic, TVM's default pipeline emitted 1,365 ``vm.builtin.make_shape`` calls per
SmolLM2 step beside ~650 kernel calls: VMShapeLower builds a shape object from the shape heap
for every tensor view and reshape, though the step has ~20 distinct shapes.
``dedupe_make_shape`` (after VMShapeLower) keeps the first of identical ``make_shape`` calls in
a scope and points the others at it. Sound because a shape-heap slot is written once (the first
``match_shape`` that binds its variable) and read only after, so equal arguments give equal
shapes anywhere the first call dominates (an earlier binding of the same or an enclosing block).

Kept on purpose: KillAfterLastUse's ~1,350 ``null_value`` calls a step. A tensor view's kill
looks free to drop (its memory is planned storage), but the storage returns to the
allocator's pool only when its last view dies, and the next allocation of that size then takes
it while it is still in the cache: without the tensor kills one-token steps measured 1.5-3%
slower (every allocation of a step got memory of its own).

Measured and not taken: relax.build's ``exec_mode="compiled"`` (the VM program as machine
code, no bytecode interpreter): one-token steps 4.15 -> 4.05 ms, 8-sequence steps 12.29 ->
12.16 (lockstep), but SmolLM2's compile took 311 s instead of ~210 (LLVM on the two step
functions of ~3,600 calls each).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

MAKE_SHAPE = "vm.builtin.make_shape"


def _is_make_shape(value) -> bool:
    return (isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc)
            and value.op.global_symbol == MAKE_SHAPE)


@relax.expr_functor.mutator
class _DedupeMakeShape(relax.PyExprMutator):
    """Replaces a ``make_shape`` binding by an earlier identical one that dominates it."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.scopes: list[list[tuple[int, relax.Call, relax.Var]]] = [[]]
        self.removed = 0

    def visit_seq_expr_(self, op):
        self.scopes.append([])  # a nested block sees the enclosing blocks' shapes, not its siblings'
        try:
            return super().visit_seq_expr_(op)
        finally:
            self.scopes.pop()

    def visit_var_binding_(self, binding):
        if not _is_make_shape(binding.value):
            return super().visit_var_binding_(binding)
        value = self.visit_expr(binding.value)
        key = tvm_ffi.structural_hash(value)
        for scope in self.scopes:
            for h, seen, var in scope:
                if h == key and tvm_ffi.structural_equal(seen, value):
                    self.set_var_remap(binding.var, var)
                    self.removed += 1
                    return
        new_var = self.builder_.emit(value, binding.var.name)
        self.set_var_remap(binding.var, new_var)
        self.scopes[-1].append((key, value, new_var))


@tvm.transform.module_pass(opt_level=0, name="DedupeMakeShape")
def dedupe_make_shape(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Identical ``vm.builtin.make_shape`` calls (after VMShapeLower) share one result."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator = _DedupeMakeShape(mod)
            new = mutator.visit_expr(func)
            if mutator.removed:
                updates[gvar] = new
    if not updates:
        return mod
    return tvm.IRModule({gvar: updates.get(gvar, func) for gvar, func in mod.functions.items()}, attrs=mod.attrs,
                        global_infos=mod.global_infos)


def relax_pipeline() -> tvm.transform.Pass:
    """The pipeline ``tvm.compile`` runs on the step's Relax module for a cpu target: TVM's
    default one for llvm (``relax.get_pipeline("default")``: the module arrives scheduled, so
    nothing fuses), then ``dedupe_make_shape``."""
    return tvm.transform.Sequential([relax.get_pipeline("default"), dedupe_make_shape], name="LlmcCpuPipeline")
