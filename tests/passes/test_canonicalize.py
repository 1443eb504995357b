"""canonicalize: no-op views and casts disappear, view chains collapse."""

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_pass_output

BEFORE = """module @m {
  func @forward(%x: f32[1, T, 8], %i: i64[T]) -> (f32[T, 8], f32[8, T], f32[T, 8], i64[T]) {
    %a = reshape(%x) {shape = [1, T, 8]} : f32[1, T, 8]
    %b = reshape(%a) {shape = [T, 2, 4]} : f32[T, 2, 4]
    %c = reshape(%b) {shape = [T, 8]} : f32[T, 8]
    %d = permute(%c) {perm = [1, 0]} : f32[8, T]
    %e = permute(%d) {perm = [1, 0]} : f32[T, 8]
    %f = permute(%e) {perm = [1, 0]} : f32[8, T]
    %one = constant() {value = 1.0, dtype = "f32"} : f32[]
    %g = mul(%c, %one) : f32[T, 8]
    %h = slice(%g) {axis = 1, start = 0, end = 8, step = 1} : f32[T, 8]
    %j = cast(%i) {dtype = "i64"} : i64[T]
    return %h, %f, %e, %j
  }
}
"""
AFTER = """module @m {
  func @forward(%x: f32[1, T, 8], %i: i64[T]) -> (f32[T, 8], f32[8, T], f32[T, 8], i64[T]) {
    %0 = reshape(%x) {shape = [T, 8]} : f32[T, 8]
    %f = permute(%0) {perm = [1, 0]} : f32[8, T]
    return %0, %f, %0, %i
  }
}
"""


def test_canonicalize_before_after():
    assert_pass_output(get_pass("canonicalize"), BEFORE, AFTER)


KEEP = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 4], f32[T, 8]) {
    %a = slice(%x) {axis = 1, start = 0, end = 4, step = 1} : f32[T, 4]
    %two = constant() {value = 2.0, dtype = "f32"} : f32[]
    %b = mul(%x, %two) : f32[T, 8]
    return %a, %b
  }
}
"""


def test_canonicalize_leaves_real_work_alone():
    assert_pass_output(get_pass("canonicalize"), KEEP, KEEP)


def test_concat_with_an_empty_operand_is_the_other_operand():
    before = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8], f32[T, 8]) {
    %e = slice(%x) {axis = 1, start = 8, end = 8, step = 1} : f32[T, 0]
    %a = concat(%x, %e) {axis = 1} : f32[T, 8]
    %b = concat(%e, %x) {axis = 1} : f32[T, 8]
    return %a, %b
  }
}
"""
    after = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8], f32[T, 8]) {
    return %x, %x
  }
}
"""
    assert_pass_output(get_pass("canonicalize"), before, after)
