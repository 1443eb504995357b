"""The text form round-trips exactly, nested regions and symbolic dims included."""

import pytest

from llmc.compiler.ir import Builder, Function, Module, TensorType, parse_module, print_module, symbol, verify
from llmc.compiler.ir.parser import ParseError

T = symbol("T")


def small_module() -> Module:
    m = Module("small", attrs={"arch": "test", "n": 3, "eps": 1e-06, "flags": [True, False, None]})
    m.add_param("w.weight", TensorType((8, 4), "f32"))
    b = Builder(m)
    x = b.arg("x", TensorType((T, 4), "f32"))
    w = b.op("param", hint="w", name="w.weight")
    y = b.op("linear", x, w, hint="y")
    r = b.op("reshape", y, shape=[2 * T, 4])
    s = b.op("slice", r, axis=0, start=1, end=2 * T, step=2)
    inner = Builder(m)
    a = inner.arg("a", TensorType((T, 4), "f32"))
    c = inner.op("constant", value=float("-inf"), dtype="f32")
    inner.ret(inner.op("maximum", inner.op("silu", a), c))
    fused = b.op("fused", s, region=inner.block, name="silu_max")
    b.ret(fused, y)
    m.add_function(Function("forward", b.block))
    return m


def test_small_module_round_trips():
    m = small_module()
    verify(m)
    text = print_module(m)
    assert "fused(%" in text and "^(%a: f32[T, 4]):" in text and "2*T" in text
    again = parse_module(text)
    verify(again)
    assert print_module(again) == text
    assert again.attrs == {"arch": "test", "n": 3, "eps": 1e-06, "flags": [True, False, None]}


def test_floats_print_exactly():
    m = Module("f")
    b = Builder(m)
    x = b.arg("x", TensorType((3,), "f32"))
    values = [0.1, 1 / 3, 9.999999747378752e-06, 1e300, -0.0, 2.5]
    outs = [b.op("mul", x, b.op("constant", value=v, dtype="f32")) for v in values]
    b.ret(*outs)
    m.add_function(Function("forward", b.block))
    parsed = parse_module(print_module(m))
    got = [op.attrs["value"] for op in parsed.functions["forward"].ops if op.kind == "constant"]
    assert got == values


@pytest.mark.parametrize("text, fragment", [
    ("module @m {\n  func @f(%x: f32[2]) -> (f32[2]) {\n    %y = neg(%x) : f32[2\n    return %y\n  }\n}\n",
     "line 3"),
    ("module @m {\n  func @f(%x: f32[2]) -> (f32[2]) {\n    %y = neg(%x) {a = } : f32[2]\n    return %y\n  }\n}\n",
     "empty attribute value"),
    ("module @m {\n  bogus\n}\n", "expected 'param', 'func' or '}'"),
    ("module @m {\n  func @f(%x: f32[2]) -> (f32[2]) {\n    return %x\n  }\n}\nextra\n", "after the end"),
])
def test_malformed_text_names_the_line(text, fragment):
    with pytest.raises(ParseError) as err:
        parse_module(text)
    assert fragment in str(err.value)
