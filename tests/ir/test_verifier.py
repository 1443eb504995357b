"""The verifier accepts well-formed modules and names the op and value of each fault."""

import pytest

from llmc.compiler.ir import VerifyError, parse_module, verify

GOOD = """module @m {
  param @w : f32[8, 4] {origin = "parameter"}
  func @forward(%x: f32[T, 4]) -> (f32[T, 8]) {
    %w0 = param() {name = "w"} : f32[8, 4]
    %y = linear(%x, %w0) : f32[T, 8]
    return %y
  }
}
"""


def check(text: str, *fragments: str):
    with pytest.raises(VerifyError) as err:
        verify(parse_module(text))
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_good_module_verifies():
    assert verify(parse_module(GOOD)) == []


def test_type_mismatch_names_op_and_value():
    check(GOOD.replace("%y = linear(%x, %w0) : f32[T, 8]", "%y = linear(%x, %w0) : f32[T, 9]")
          .replace("-> (f32[T, 8])", "-> (f32[T, 9])"),
          "%y = linear(%x, %w0)", "declared f32[T, 9]", "gives f32[T, 8]")


def test_operand_shape_error_is_reported_as_type_error():
    check(GOOD.replace("param @w : f32[8, 4]", "param @w : f32[8, 5]").replace(
        ': f32[8, 4]\n    %y', ': f32[8, 5]\n    %y'), "linear input has K=4 but weight has K=5")


def test_use_before_definition():
    text = GOOD.replace("""    %w0 = param() {name = "w"} : f32[8, 4]
    %y = linear(%x, %w0) : f32[T, 8]""", """    %y = linear(%x, %w0) : f32[T, 8]
    %w0 = param() {name = "w"} : f32[8, 4]""")
    check(text, "uses %w0 before its definition")


def test_unknown_op():
    check(GOOD.replace("%y = linear(%x, %w0)", "%y = frobnicate(%x, %w0)"), "unknown op kind 'frobnicate'")


def test_bad_and_missing_attributes():
    check(GOOD.replace('{name = "w"}', "{name = 3}"), "attribute 'name' must be str, got 3")
    check(GOOD.replace(' {name = "w"}', ""), "missing attribute 'name'")
    check(GOOD.replace('{name = "w"}', '{name = "w", color = "red"}'), "unknown attribute 'color'")


def test_unknown_param():
    check(GOOD.replace('{name = "w"}', '{name = "nope"}'), "param @nope is not in the module's parameter table")


def test_double_definition_and_bad_return():
    text = GOOD.replace("    return %y", "    %y = neg(%y) : f32[T, 8]\n    return %z")
    check(text, "defined twice", "returns %z, which is not defined")


def test_wrong_operand_count_and_dtype_mix():
    check(GOOD.replace("%y = linear(%x, %w0) : f32[T, 8]", "%y = linear(%x) : f32[T, 8]"), "linear")
    text = """module @m {
  func @forward(%x: f32[4], %i: i64[4]) -> (f32[4]) {
    %y = add(%x, %i) : f32[4]
    return %y
  }
}
"""
    check(text, "operands must share one dtype", "%y = add(%x, %i)")


def test_attention_checks_head_layout():
    text = """module @m {
  func @forward(%q: f32[T, 4, 16], %k: f32[T, 3, 16], %v: f32[T, 3, 16], %p: i64[T]) -> (f32[T, 4, 16]) {
    %o = attention(%q, %k, %v, %p) {layer = 0, scale = 0.25, window = 0, softcap = 0.0} : f32[T, 4, 16]
    return %o
  }
}
"""
    check(text, "query heads 4 are not a multiple of KV heads 3")
    assert verify(parse_module(text.replace("T, 3, 16", "T, 2, 16"))) == []


def test_fused_region_must_match_operands():
    text = """module @m {
  func @forward(%x: f32[4]) -> (f32[4]) {
    %y = fused(%x) {name = "f"} : f32[4] {
      ^(%a: f32[5]):
        %b = neg(%a) : f32[5]
        yield %b
    }
    return %y
  }
}
"""
    check(text, "fused region arg %a: f32[5] does not match operand type f32[4]")
