"""The cpu target's Relax pipeline (compiler/codegen/tvm/vm_pipeline.py): before/after on a small
function with a symbolic row count, the shape of the batched step. The lean pipeline must
emit one ``make_shape`` per distinct shape, keep every register kill (they let storage return
to the allocator's pool mid-call), and compute the same numbers as TVM's default pipeline on
fresh random inputs of several row counts."""

import collections
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402
from tvm import relax, tirx as tir  # noqa: E402

from llmc.compiler.codegen.tvm import vm_pipeline  # noqa: E402

TARGET = {"kind": "llvm"}


def symbolic_rows_function() -> tvm.IRModule:
    """x [m, 4] -> a chain of elementwise ops and reshapes: every intermediate tensor has a shape
    built from m at run time, several of them the same shape."""
    bb = relax.BlockBuilder()
    m = tir.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([m, 4], "float32"))
    y = relax.Var("y", relax.TensorType([m, 4], "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(x, y))
            b = bb.emit(relax.op.multiply(a, x))
            c = bb.emit(relax.op.reshape(b, [m * 2, 2]))
            d = bb.emit(relax.op.add(c, c))
            e = bb.emit(relax.op.reshape(d, [m, 4]))
            f = bb.emit(relax.op.subtract(e, y))
            g = bb.emit(relax.op.multiply(f, a))
            halves = bb.emit(relax.op.split(g, 2, axis=1))  # a kernel with two results
            h = bb.emit(relax.op.concat([relax.TupleGetItem(halves, 1), relax.TupleGetItem(halves, 0)], axis=1))
            out = bb.emit_output(relax.op.add(h, b))
        bb.emit_func_output(out)
    return bb.get()


def calls(mod: tvm.IRModule) -> dict:
    """The calls of the lowered ``main`` by callee (VM builtins and ``relax.vm.*`` ops): name ->
    list of the calls."""
    found: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call):
            op = expr.op
            name = str(op.global_symbol) if isinstance(op, relax.ExternFunc) else getattr(op, "name", None)
            if name:
                found.setdefault(name, []).append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def distinct(exprs) -> int:
    kept = []
    for e in exprs:
        if not any(tvm_ffi.structural_equal(e, k) for k in kept):
            kept.append(e)
    return len(kept)


def lowered(mod, pipeline):
    with tvm.target.Target(TARGET):
        return pipeline(mod)


def test_lean_pipeline_builds_each_shape_once():
    mod = symbolic_rows_function()
    before = calls(lowered(mod, relax.get_pipeline("default")))
    after = calls(lowered(mod, vm_pipeline.relax_pipeline()))
    assert len(after["relax.vm.kill_object"]) == len(before["relax.vm.kill_object"]) > 0
    # every tensor view and reshape built its shape by default; now one call per distinct shape
    shapes = before["vm.builtin.make_shape"]
    assert distinct(shapes) < len(shapes)
    assert len(after["vm.builtin.make_shape"]) == distinct(shapes)
    assert len(after["relax.vm.alloc_tensor"]) == len(before["relax.vm.alloc_tensor"])


def vm_calls(mod) -> dict:
    """Callee -> count over the compiled VM program's instructions."""
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET), relax_pipeline=vm_pipeline.relax_pipeline())
    return collections.Counter(re.findall(r"call\s+(\S+)", ex.as_text()))


def test_lean_program_copies_nothing():
    """KillAfterLastUse folds aliases and the items of known tuples (which would otherwise
    become register copies); the pass after it must not bring them back."""
    counts = vm_calls(symbolic_rows_function())
    assert counts["vm.builtin.copy"] == 0
    assert counts["vm.builtin.tuple_getitem"] == 0
    assert counts["vm.builtin.make_shape"] > 0


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_lean_pipeline_computes_what_the_default_one_does(rows):
    mod = symbolic_rows_function()
    rng = np.random.default_rng(rows)
    x, y = (rng.standard_normal((rows, 4)).astype(np.float32) for _ in range(2))
    results = []
    for pipeline in (relax.get_pipeline("default"), vm_pipeline.relax_pipeline()):
        ex = tvm.compile(mod, target=tvm.target.Target(TARGET), relax_pipeline=pipeline)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy())
    a = x + y
    b = a * x
    g = ((b + b) - y) * a
    expected = np.concatenate([g[:, 2:], g[:, :2]], axis=1) + b
    np.testing.assert_allclose(results[1], expected, rtol=1e-6)
    np.testing.assert_array_equal(results[1], results[0])
