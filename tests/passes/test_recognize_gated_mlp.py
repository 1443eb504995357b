"""recognize-gated-mlp: IR before/after on hand-written cases, then equal outputs and one glu op
per layer on every tiny architecture and on SmolLM2."""

import pytest

from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_keeps_outputs, assert_pass_output, run_on_copy
from tests.tiny_models import BASE

PASS = get_pass("recognize-gated-mlp")

SWIGLU = """module @m {
  func @forward(%g: f32[T, 6], %u: f32[T, 6]) -> (f32[T, 6]) {
    %act = silu(%g) : f32[T, 6]
    %y = mul(%act, %u) : f32[T, 6]
    return %y
  }
}
"""


def after(activation: str) -> str:
    return f"""module @m {{
  func @forward(%g: f32[T, 6], %u: f32[T, 6]) -> (f32[T, 6]) {{
    %glu = glu(%g, %u) {{activation = "{activation}"}} : f32[T, 6]
    return %glu
  }}
}}
"""


def test_swiglu():
    assert_pass_output(PASS, SWIGLU, after("silu"))


def test_up_first():
    assert_pass_output(PASS, SWIGLU.replace("mul(%act, %u)", "mul(%u, %act)"), after("silu"))


@pytest.mark.parametrize("approximate, activation", [("tanh", "gelu_tanh"), ("none", "gelu")])
def test_geglu(approximate, activation):
    before = SWIGLU.replace("silu(%g)", f'gelu(%g) {{approximate = "{approximate}"}}')
    assert_pass_output(PASS, before, after(activation))


def test_activation_with_two_uses_does_not_fire():
    text = """module @m {
  func @forward(%g: f32[T, 6], %u: f32[T, 6]) -> (f32[T, 6], f32[T, 6]) {
    %act = silu(%g) : f32[T, 6]
    %y = mul(%act, %u) : f32[T, 6]
    return %y, %act
  }
}
"""
    assert_pass_output(PASS, text, text)


def test_other_activation_does_not_fire():
    text = SWIGLU.replace("silu(%g)", "sigmoid(%g)")
    assert_pass_output(PASS, text, text)


# ------------------------------------------------------------------ real models


def test_tiny_arch_same_outputs_and_counts(tiny_imported):
    name, imp = tiny_imported
    module = run_on_copy("recognize-gated-mlp", imp.module)
    glus = [op for op in module.functions["forward"].ops if op.kind == "glu"]
    assert [op.attrs["activation"] for op in glus] == ["gelu_tanh" if name.startswith("gemma") else "silu"] * 2
    assert_keeps_outputs(imp, module, BASE["vocab_size"])


def test_smollm2(smollm2):
    _, _, imp = smollm2
    module = run_on_copy("recognize-gated-mlp", imp.module)
    ops = module.functions["forward"].ops
    assert sum(op.kind == "glu" for op in ops) == 30
    assert not [op for op in ops if op.kind == "silu"]
    assert_keeps_outputs(imp, module, 49152, atol=1e-4)
