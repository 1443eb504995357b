"""constant-fold: scalar arithmetic on constants becomes one constant (interpreter semantics)."""

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_pass_output

BEFORE = """module @m {
  func @forward(%x: f32[T]) -> (f32[T]) {
    %a = constant() {value = 64, dtype = "i64"} : i64[]
    %b = cast(%a) {dtype = "f32"} : f32[]
    %c = sqrt(%b) : f32[]
    %d = constant() {value = 0.5, dtype = "f32"} : f32[]
    %e = mul(%c, %d) : f32[]
    %y = mul(%x, %e) : f32[T]
    return %y
  }
}
"""
AFTER = """module @m {
  func @forward(%x: f32[T]) -> (f32[T]) {
    %2 = constant() {value = 4.0, dtype = "f32"} : f32[]
    %y = mul(%x, %2) : f32[T]
    return %y
  }
}
"""


def test_constant_fold_before_after():
    assert_pass_output(get_pass("constant-fold"), BEFORE, AFTER)
