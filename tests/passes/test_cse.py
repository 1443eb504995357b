"""cse: equal pure ops merge; attention (it writes the KV cache) never does."""

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_pass_output

BEFORE = """module @m {
  param @w : f32[8, 8] {origin = "parameter"}
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %w1 = param() {name = "w"} : f32[8, 8]
    %w2 = param() {name = "w"} : f32[8, 8]
    %a = linear(%x, %w1) : f32[T, 8]
    %b = linear(%x, %w2) : f32[T, 8]
    %c1 = constant() {value = 0.5, dtype = "f32"} : f32[]
    %c2 = constant() {value = 0.5, dtype = "f32"} : f32[]
    %d = mul(%a, %c1) : f32[T, 8]
    %e = mul(%b, %c2) : f32[T, 8]
    %f = add(%d, %e) : f32[T, 8]
    return %f
  }
}
"""
AFTER = """module @m {
  param @w : f32[8, 8] {origin = "parameter"}
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %w1 = param() {name = "w"} : f32[8, 8]
    %a = linear(%x, %w1) : f32[T, 8]
    %c1 = constant() {value = 0.5, dtype = "f32"} : f32[]
    %d = mul(%a, %c1) : f32[T, 8]
    %f = add(%d, %d) : f32[T, 8]
    return %f
  }
}
"""

ATTENTION_TWICE = """module @m {
  func @forward(%q: f32[T, 2, 4], %p: i64[T]) -> (f32[T, 2, 4]) {
    %a = attention(%q, %q, %q, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0} : f32[T, 2, 4]
    %b = attention(%q, %q, %q, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0} : f32[T, 2, 4]
    %c = add(%a, %b) : f32[T, 2, 4]
    return %c
  }
}
"""


def test_cse_before_after():
    assert_pass_output(get_pass("cse"), BEFORE, AFTER)


def test_cse_keeps_ops_with_effects():
    assert_pass_output(get_pass("cse"), ATTENTION_TWICE, ATTENTION_TWICE)
