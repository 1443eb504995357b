"""dce: unused pure ops go; attention stays even when its result is unused (KV writes)."""

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_pass_output

BEFORE = """module @m {
  func @forward(%q: f32[T, 2, 4], %p: i64[T]) -> (f32[T, 2, 4]) {
    %unused = neg(%q) : f32[T, 2, 4]
    %unused2 = exp(%unused) : f32[T, 2, 4]
    %a = attention(%q, %q, %q, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0} : f32[T, 2, 4]
    %b = sin(%q) : f32[T, 2, 4]
    return %b
  }
}
"""
AFTER = """module @m {
  func @forward(%q: f32[T, 2, 4], %p: i64[T]) -> (f32[T, 2, 4]) {
    %a = attention(%q, %q, %q, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0} : f32[T, 2, 4]
    %b = sin(%q) : f32[T, 2, 4]
    return %b
  }
}
"""


def test_dce_before_after():
    assert_pass_output(get_pass("dce"), BEFORE, AFTER)
