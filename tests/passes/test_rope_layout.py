"""rope-layout: IR before/after on hand-written cases (the pass, then canonicalize cancelling the
permute pair), then equal outputs and no transposes left around RoPE on every tiny
architecture and on SmolLM2."""

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_keeps_outputs, assert_pass_output, run_on_copy, run_pass_on_text
from tests.tiny_models import BASE

PASS = get_pass("rope-layout")

BEFORE = """module @m {
  func @forward(%x: f32[1, T, 3, 4], %cos: f32[1, 1, T, 4], %sin: f32[1, 1, T, 4]) -> (f32[1, T, 3, 4]) {
    %t = permute(%x) {perm = [0, 2, 1, 3]} : f32[1, 3, T, 4]
    %r = rope(%t, %cos, %sin) : f32[1, 3, T, 4]
    %y = permute(%r) {perm = [0, 2, 1, 3]} : f32[1, T, 3, 4]
    return %y
  }
}
"""

AFTER = """module @m {
  func @forward(%x: f32[1, T, 3, 4], %cos: f32[1, 1, T, 4], %sin: f32[1, 1, T, 4]) -> (f32[1, T, 3, 4]) {
    %0 = permute(%cos) {perm = [0, 2, 1, 3]} : f32[1, T, 1, 4]
    %1 = permute(%sin) {perm = [0, 2, 1, 3]} : f32[1, T, 1, 4]
    %rope = rope(%x, %0, %1) : f32[1, T, 3, 4]
    %2 = permute(%rope) {perm = [0, 2, 1, 3]} : f32[1, 3, T, 4]
    %y = permute(%2) {perm = [0, 2, 1, 3]} : f32[1, T, 3, 4]
    return %y
  }
}
"""

CANCELLED = """module @m {
  func @forward(%x: f32[1, T, 3, 4], %cos: f32[1, 1, T, 4], %sin: f32[1, 1, T, 4]) -> (f32[1, T, 3, 4]) {
    %0 = permute(%cos) {perm = [0, 2, 1, 3]} : f32[1, T, 1, 4]
    %1 = permute(%sin) {perm = [0, 2, 1, 3]} : f32[1, T, 1, 4]
    %rope = rope(%x, %0, %1) : f32[1, T, 3, 4]
    return %rope
  }
}
"""


def test_rope_moves_before_the_permute():
    assert_pass_output(PASS, BEFORE, AFTER)


def test_canonicalize_then_cancels_the_pair():
    assert_pass_output(get_pass("canonicalize"), run_pass_on_text(PASS, BEFORE), CANCELLED)


def test_permute_of_the_rotated_dim_does_not_fire():
    text = """module @m {
  func @forward(%x: f32[4, T], %cos: f32[T, 4], %sin: f32[T, 4]) -> (f32[T, 4]) {
    %t = permute(%x) {perm = [1, 0]} : f32[T, 4]
    %r = rope(%t, %cos, %sin) : f32[T, 4]
    return %r
  }
}
"""
    assert_pass_output(PASS, text, text)


def test_permute_with_another_use_does_not_fire():
    text = BEFORE.replace("-> (f32[1, T, 3, 4]) {", "-> (f32[1, T, 3, 4], f32[1, 3, T, 4]) {").replace(
        "return %y", "return %y, %t")
    assert_pass_output(PASS, text, text)


# ------------------------------------------------------------------ real models


def _ropes_reading_permutes(module):
    return [op for op in module.functions["forward"].ops
            if op.kind == "rope" and op.operands[0].producer.kind == "permute"]


def test_tiny_arch_same_outputs_and_no_transposed_rope(tiny_imported):
    _, imp = tiny_imported
    module = run_on_copy("dce", run_on_copy("canonicalize", run_on_copy("recognize-rope", imp.module)))
    assert _ropes_reading_permutes(module)
    module = run_on_copy("canonicalize", run_on_copy("rope-layout", module))
    assert not _ropes_reading_permutes(module)
    assert_keeps_outputs(imp, module, BASE["vocab_size"])


def test_smollm2_loses_two_transposes_per_layer(smollm2):
    _, _, imp = smollm2
    module = run_on_copy("canonicalize", run_on_copy("recognize-rope", imp.module))
    count = lambda m: sum(op.kind == "permute" for op in m.functions["forward"].ops)  # noqa: E731
    before = count(module)
    module = run_on_copy("cse", run_on_copy("canonicalize", run_on_copy("rope-layout", module)))
    assert not _ropes_reading_permutes(module)
    assert count(module) == before - 4 * 30 + 2  # q and k: two transposes each per layer; one cos/sin table pair
    assert_keeps_outputs(imp, module, 49152, atol=1e-4)
