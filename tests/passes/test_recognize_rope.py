"""recognize-rope: IR before/after on hand-written cases, then equal outputs and two rope ops per
layer (q and k) on every tiny architecture and on SmolLM2."""

import pytest

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_keeps_outputs, assert_pass_output, run_on_copy
from tests.tiny_models import BASE

PASS = get_pass("recognize-rope")

# as the frontend imports it: x [heads, T, D] with cos, sin [T, D] broadcast over heads
ROTATE_HALF = """module @m {
  func @forward(%x: f32[2, T, 8], %cos: f32[T, 8], %sin: f32[T, 8]) -> (f32[2, T, 8]) {
    %xc = mul(%x, %cos) : f32[2, T, 8]
    %lo = slice(%x) {axis = 2, start = 0, end = 4, step = 1} : f32[2, T, 4]
    %hi = slice(%x) {axis = 2, start = 4, end = 8, step = 1} : f32[2, T, 4]
    %neg = neg(%hi) : f32[2, T, 4]
    %rot = concat(%neg, %lo) {axis = 2} : f32[2, T, 8]
    %rs = mul(%rot, %sin) : f32[2, T, 8]
    %y = add(%xc, %rs) : f32[2, T, 8]
    return %y
  }
}
"""

AFTER = """module @m {
  func @forward(%x: f32[2, T, 8], %cos: f32[T, 8], %sin: f32[T, 8]) -> (f32[2, T, 8]) {
    %rope = rope(%x, %cos, %sin) : f32[2, T, 8]
    return %rope
  }
}
"""


def test_rotate_half_form():
    assert_pass_output(PASS, ROTATE_HALF, AFTER)


def test_swapped_operands_and_negative_axes():
    before = (ROTATE_HALF.replace("{axis = 2", "{axis = -1")
              .replace("mul(%x, %cos)", "mul(%cos, %x)").replace("mul(%rot, %sin)", "mul(%sin, %rot)")
              .replace("add(%xc, %rs)", "add(%rs, %xc)"))
    assert_pass_output(PASS, before, AFTER)


@pytest.mark.parametrize("old, new", [
    ("concat(%neg, %lo)", "concat(%lo, %neg)"),                          # rotates the other way
    ("neg(%hi)", "abs(%hi)"),                                            # not a negation
    ("start = 4, end = 8", "start = 3, end = 7"),                        # not the upper half
    ("mul(%x, %cos) : f32[2, T, 8]", "mul(%sin, %cos) : f32[T, 8]"),     # cos scales another tensor
])
def test_does_not_fire(old, new):
    text = ROTATE_HALF.replace(old, new)
    assert_pass_output(PASS, text, text)


def test_halves_of_another_axis_do_not_fire():
    text = (ROTATE_HALF.replace("T", "8").replace("{axis = 2", "{axis = 1")
            .replace("f32[2, 8, 4]", "f32[2, 4, 8]"))
    assert "axis = 1" in text and "f32[2, 4, 8]" in text
    assert_pass_output(PASS, text, text)


def test_cos_that_broadcasts_x_does_not_fire():
    """rope keeps x's shape, so a cos that widens x·cos cannot be folded into it."""
    text = """module @m {
  func @forward(%x: f32[1, T, 8], %cos: f32[2, T, 8], %sin: f32[T, 8]) -> (f32[2, T, 8]) {
    %xc = mul(%x, %cos) : f32[2, T, 8]
    %lo = slice(%x) {axis = 2, start = 0, end = 4, step = 1} : f32[1, T, 4]
    %hi = slice(%x) {axis = 2, start = 4, end = 8, step = 1} : f32[1, T, 4]
    %neg = neg(%hi) : f32[1, T, 4]
    %rot = concat(%neg, %lo) {axis = 2} : f32[1, T, 8]
    %rs = mul(%rot, %sin) : f32[1, T, 8]
    %y = add(%xc, %rs) : f32[2, T, 8]
    return %y
  }
}
"""
    assert_pass_output(PASS, text, text)


# ------------------------------------------------------------------ real models


def test_tiny_arch_same_outputs_and_counts(tiny_imported):
    name, imp = tiny_imported
    module = run_on_copy("recognize-rope", imp.module)
    ops = module.functions["forward"].ops
    assert sum(op.kind == "rope" for op in ops) == 2 * 2  # q and k in each of 2 layers
    assert not [op for op in ops if op.kind == "neg"]
    assert_keeps_outputs(imp, module, BASE["vocab_size"])


def test_smollm2(smollm2):
    _, _, imp = smollm2
    module = run_on_copy("recognize-rope", imp.module)
    assert sum(op.kind == "rope" for op in module.functions["forward"].ops) == 60
    assert_keeps_outputs(imp, module, 49152, atol=1e-4)
