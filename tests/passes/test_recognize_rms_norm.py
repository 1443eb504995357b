"""recognize-rms-norm: IR before/after on hand-written cases, then equal outputs and the expected
number of rms_norm ops on every tiny architecture and on SmolLM2."""

import pytest

from llmc.compiler.ir import parse_module, verify
from llmc.compiler.passes import get_pass
from tests.passes.helpers import assert_keeps_outputs, assert_pass_output, run_on_copy
from tests.tiny_models import BASE

PASS = get_pass("recognize-rms-norm")

LLAMA = """module @m {
  param @w : f32[8] {origin = "parameter"}
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %w = param() {name = "w"} : f32[8]
    %two = constant() {value = 2.0, dtype = "f32"} : f32[]
    %sq = pow(%x, %two) : f32[T, 8]
    %ms = mean(%sq) {axes = [-1], keepdim = true} : f32[T, 1]
    %eps = constant() {value = 1e-06, dtype = "f32"} : f32[]
    %den = add(%ms, %eps) : f32[T, 1]
    %inv = rsqrt(%den) : f32[T, 1]
    %normed = mul(%x, %inv) : f32[T, 8]
    %y = mul(%w, %normed) : f32[T, 8]
    return %y
  }
}
"""


def test_llama_form():
    assert_pass_output(PASS, LLAMA, """module @m {
  param @w : f32[8] {origin = "parameter"}
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %w = param() {name = "w"} : f32[8]
    %rms_norm = rms_norm(%x, %w) {eps = 1e-06, weight_offset = 0.0} : f32[T, 8]
    return %rms_norm
  }
}
""")


def test_gemma_offset_with_swapped_operands_and_positive_axis():
    before = """module @m {
  param @w : f32[8] {origin = "parameter"}
  func @forward(%x: f32[2, T, 8]) -> (f32[2, T, 8]) {
    %w = param() {name = "w"} : f32[8]
    %two = constant() {value = 2.0, dtype = "f32"} : f32[]
    %sq = pow(%x, %two) : f32[2, T, 8]
    %ms = mean(%sq) {axes = [2], keepdim = true} : f32[2, T, 1]
    %eps = constant() {value = 1e-05, dtype = "f32"} : f32[]
    %den = add(%eps, %ms) : f32[2, T, 1]
    %inv = rsqrt(%den) : f32[2, T, 1]
    %normed = mul(%inv, %x) : f32[2, T, 8]
    %one = constant() {value = 1.0, dtype = "f32"} : f32[]
    %scale = add(%one, %w) : f32[8]
    %y = mul(%normed, %scale) : f32[2, T, 8]
    return %y
  }
}
"""
    assert_pass_output(PASS, before, """module @m {
  param @w : f32[8] {origin = "parameter"}
  func @forward(%x: f32[2, T, 8]) -> (f32[2, T, 8]) {
    %w = param() {name = "w"} : f32[8]
    %rms_norm = rms_norm(%x, %w) {eps = 1e-05, weight_offset = 1.0} : f32[2, T, 8]
    return %rms_norm
  }
}
""")


def test_intermediate_with_other_use_stays():
    before = LLAMA.replace("-> (f32[T, 8])", "-> (f32[T, 8], f32[T, 1])").replace("return %y", "return %y, %inv")
    module = PASS.run(parse_module(before))
    verify(module)
    kinds = [op.kind for op in module.functions["forward"].ops]
    assert kinds.count("rms_norm") == 1 and kinds.count("rsqrt") == 1  # %inv is still returned


@pytest.mark.parametrize("changes", [
    [("axes = [-1]", "axes = [0]"), ("f32[T, 1]", "f32[1, 8]")],  # mean over the token axis
    [("f32[8]", "f32[1, 8]")],                                     # weight broadcasts but is not [D]
    [("constant() {value = 2.0", "constant() {value = 3.0")],      # not a square
])
def test_does_not_fire(changes):
    text = LLAMA
    for old, new in changes:
        text = text.replace(old, new)
    assert_pass_output(PASS, text, text)


def test_mean_without_keepdim_does_not_fire():
    text = """module @m {
  param @w : f32[4] {origin = "parameter"}
  func @forward(%x: f32[4, 4]) -> (f32[4, 4]) {
    %w = param() {name = "w"} : f32[4]
    %two = constant() {value = 2.0, dtype = "f32"} : f32[]
    %sq = pow(%x, %two) : f32[4, 4]
    %ms = mean(%sq) {axes = [-1], keepdim = false} : f32[4]
    %eps = constant() {value = 1e-06, dtype = "f32"} : f32[]
    %den = add(%ms, %eps) : f32[4]
    %inv = rsqrt(%den) : f32[4]
    %normed = mul(%x, %inv) : f32[4, 4]
    %y = mul(%w, %normed) : f32[4, 4]
    return %y
  }
}
"""
    assert_pass_output(PASS, text, text)


# ------------------------------------------------------------------ real models

# two layers: input and post-attention norms per layer plus the final norm, unless noted
EXPECTED = {"qwen3": 2 * 4 + 1,   # q and k norms too
            "gemma2": 2 * 4 + 1}  # pre/post attention and pre/post feed-forward norms


def test_tiny_arch_same_outputs_and_counts(tiny_imported):
    name, imp = tiny_imported
    module = run_on_copy("recognize-rms-norm", imp.module)
    ops = module.functions["forward"].ops
    norms = [op for op in ops if op.kind == "rms_norm"]
    assert len(norms) == EXPECTED.get(name, 2 * 2 + 1)
    assert {op.attrs["weight_offset"] for op in norms} == {1.0 if name.startswith("gemma") else 0.0}
    assert not [op for op in ops if op.kind == "rsqrt"]
    assert_keeps_outputs(imp, module, BASE["vocab_size"])


def test_smollm2(smollm2):
    _, _, imp = smollm2
    module = run_on_copy("recognize-rms-norm", imp.module)
    assert sum(op.kind == "rms_norm" for op in module.functions["forward"].ops) == 61
    assert_keeps_outputs(imp, module, 49152, atol=1e-4)
