"""fuse-elementwise: exact before/after IR for each grouping rule, and equal interpreter
outputs (with regions actually formed) on every tiny architecture and on SmolLM2."""

import pytest

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.passes import PassNotFound, get_pass
from llmc.compiler.passes.fuse_elementwise import FuseElementwise, fusion_stats
from tests.passes.helpers import assert_pass_output, assert_same_outputs, model_outputs, run_pass_on_text
from tests.tiny_models import TINY_ARCHS, tiny_model

# An elementwise chain becomes one region (%y, used twice, is one input); softmax is never
# fused and the lone neg after it stays a plain op.
CHAIN_BEFORE = """module @m {
  func @forward(%x: f32[T, 8], %y: f32[T, 8]) -> (f32[T, 8]) {
    %a = add(%x, %y) : f32[T, 8]
    %b = silu(%a) : f32[T, 8]
    %c = mul(%b, %y) : f32[T, 8]
    %s = softmax(%c) {axis = 1} : f32[T, 8]
    %d = neg(%s) : f32[T, 8]
    return %d
  }
}
"""

CHAIN_AFTER = """module @m {
  func @forward(%x: f32[T, 8], %y: f32[T, 8]) -> (f32[T, 8]) {
    %c = fused(%x, %y) {name = "fused_add_silu_mul_0"} : f32[T, 8] {
      ^(%x: f32[T, 8], %y: f32[T, 8]):
      %a = add(%x, %y) : f32[T, 8]
      %b = silu(%a) : f32[T, 8]
      %c = mul(%b, %y) : f32[T, 8]
      yield %c
    }
    %s = softmax(%c) {axis = 1} : f32[T, 8]
    %d = neg(%s) : f32[T, 8]
    return %d
  }
}
"""


# Epilogues: glu joins one of its two linear producers (one anchor per group), and the
# residual add joins the down projection.
EPILOGUE_BEFORE = """module @m {
  param @wg : f32[16, 8] {origin = "parameter"}
  param @wu : f32[16, 8] {origin = "parameter"}
  param @wd : f32[8, 16] {origin = "parameter"}
  func @forward(%x: f32[T, 8], %h: f32[T, 8]) -> (f32[T, 8]) {
    %wg = param() {name = "wg"} : f32[16, 8]
    %wu = param() {name = "wu"} : f32[16, 8]
    %wd = param() {name = "wd"} : f32[8, 16]
    %g = linear(%x, %wg) : f32[T, 16]
    %u = linear(%x, %wu) : f32[T, 16]
    %m = glu(%g, %u) {activation = "silu"} : f32[T, 16]
    %d = linear(%m, %wd) : f32[T, 8]
    %r = add(%h, %d) : f32[T, 8]
    return %r
  }
}
"""

EPILOGUE_AFTER = """module @m {
  param @wg : f32[16, 8] {origin = "parameter"}
  param @wu : f32[16, 8] {origin = "parameter"}
  param @wd : f32[8, 16] {origin = "parameter"}
  func @forward(%x: f32[T, 8], %h: f32[T, 8]) -> (f32[T, 8]) {
    %wg = param() {name = "wg"} : f32[16, 8]
    %wu = param() {name = "wu"} : f32[16, 8]
    %wd = param() {name = "wd"} : f32[8, 16]
    %u = linear(%x, %wu) : f32[T, 16]
    %m = fused(%x, %wg, %u) {name = "fused_linear_glu_0"} : f32[T, 16] {
      ^(%x: f32[T, 8], %wg: f32[16, 8], %u: f32[T, 16]):
      %g = linear(%x, %wg) : f32[T, 16]
      %m = glu(%g, %u) {activation = "silu"} : f32[T, 16]
      yield %m
    }
    %r = fused(%m, %wd, %h) {name = "fused_linear_add_1"} : f32[T, 8] {
      ^(%m: f32[T, 16], %wd: f32[8, 16], %h: f32[T, 8]):
      %d = linear(%m, %wd) : f32[T, 8]
      %r = add(%h, %d) : f32[T, 8]
      yield %r
    }
    return %r
  }
}
"""


# Prologue: the residual add feeding rms_norm stays out of o_proj's epilogue, so add + rms_norm
# form one region with two results (new residual stream and normed value).
NORM_BEFORE = """module @m {
  param @wo : f32[8, 8] {origin = "parameter"}
  param @wq : f32[8, 8] {origin = "parameter"}
  param @nw : f32[8] {origin = "parameter"}
  func @forward(%a: f32[T, 8], %h: f32[T, 8]) -> (f32[T, 8]) {
    %wo = param() {name = "wo"} : f32[8, 8]
    %wq = param() {name = "wq"} : f32[8, 8]
    %nw = param() {name = "nw"} : f32[8]
    %o = linear(%a, %wo) : f32[T, 8]
    %h2 = add(%h, %o) : f32[T, 8]
    %n = rms_norm(%h2, %nw) {eps = 1e-06, weight_offset = 0.0} : f32[T, 8]
    %q = linear(%n, %wq) : f32[T, 8]
    %out = add(%h2, %q) : f32[T, 8]
    return %out
  }
}
"""

NORM_AFTER = """module @m {
  param @wo : f32[8, 8] {origin = "parameter"}
  param @wq : f32[8, 8] {origin = "parameter"}
  param @nw : f32[8] {origin = "parameter"}
  func @forward(%a: f32[T, 8], %h: f32[T, 8]) -> (f32[T, 8]) {
    %wo = param() {name = "wo"} : f32[8, 8]
    %wq = param() {name = "wq"} : f32[8, 8]
    %nw = param() {name = "nw"} : f32[8]
    %o = linear(%a, %wo) : f32[T, 8]
    %h2, %n = fused(%h, %o, %nw) {name = "fused_add_rms_norm_0"} : f32[T, 8], f32[T, 8] {
      ^(%h: f32[T, 8], %o: f32[T, 8], %nw: f32[8]):
      %h2 = add(%h, %o) : f32[T, 8]
      %n = rms_norm(%h2, %nw) {eps = 1e-06, weight_offset = 0.0} : f32[T, 8]
      yield %h2, %n
    }
    %out = fused(%n, %wq, %h2) {name = "fused_linear_add_1"} : f32[T, 8] {
      ^(%n: f32[T, 8], %wq: f32[8, 8], %h2: f32[T, 8]):
      %q = linear(%n, %wq) : f32[T, 8]
      %out = add(%h2, %q) : f32[T, 8]
      yield %out
    }
    return %out
  }
}
"""


# Legality: %c may not join {%a, %b}, because %s reads %a before %c; the region would sit at %c,
# after its user. {%a, %b} is fused where %b was, {%c, %d} separately.
ILLEGAL_BEFORE = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %a = exp(%x) : f32[T, 8]
    %b = neg(%a) : f32[T, 8]
    %s = sum(%a) {axes = [1], keepdim = true} : f32[T, 1]
    %c = mul(%b, %s) : f32[T, 8]
    %d = add(%c, %x) : f32[T, 8]
    return %d
  }
}
"""

ILLEGAL_AFTER = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %a, %b = fused(%x) {name = "fused_exp_neg_0"} : f32[T, 8], f32[T, 8] {
      ^(%x: f32[T, 8]):
      %a = exp(%x) : f32[T, 8]
      %b = neg(%a) : f32[T, 8]
      yield %a, %b
    }
    %s = sum(%a) {axes = [1], keepdim = true} : f32[T, 1]
    %d = fused(%b, %s, %x) {name = "fused_mul_add_1"} : f32[T, 8] {
      ^(%b: f32[T, 8], %s: f32[T, 1], %x: f32[T, 8]):
      %c = mul(%b, %s) : f32[T, 8]
      %d = add(%c, %x) : f32[T, 8]
      yield %d
    }
    return %d
  }
}
"""


# Constants are cloned into each region that uses them (never region inputs); the outer
# %half dies, %one stays because the function returns it.
CONSTS_BEFORE = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8], f32[]) {
    %half = constant() {value = 0.5, dtype = "f32"} : f32[]
    %one = constant() {value = 1.0, dtype = "f32"} : f32[]
    %a = mul(%x, %half) : f32[T, 8]
    %b = tanh(%a) : f32[T, 8]
    %s = softmax(%b) {axis = 1} : f32[T, 8]
    %d = add(%s, %half) : f32[T, 8]
    %e = mul(%d, %one) : f32[T, 8]
    return %e, %one
  }
}
"""

CONSTS_AFTER = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8], f32[]) {
    %one = constant() {value = 1.0, dtype = "f32"} : f32[]
    %b = fused(%x) {name = "fused_mul_tanh_0"} : f32[T, 8] {
      ^(%x: f32[T, 8]):
      %half = constant() {value = 0.5, dtype = "f32"} : f32[]
      %a = mul(%x, %half) : f32[T, 8]
      %b = tanh(%a) : f32[T, 8]
      yield %b
    }
    %s = softmax(%b) {axis = 1} : f32[T, 8]
    %e = fused(%s) {name = "fused_add_mul_1"} : f32[T, 8] {
      ^(%s: f32[T, 8]):
      %half = constant() {value = 0.5, dtype = "f32"} : f32[]
      %d = add(%s, %half) : f32[T, 8]
      %one = constant() {value = 1.0, dtype = "f32"} : f32[]
      %e = mul(%d, %one) : f32[T, 8]
      yield %e
    }
    return %e, %one
  }
}
"""


@pytest.mark.parametrize("before, after", [
    (CHAIN_BEFORE, CHAIN_AFTER),
    (EPILOGUE_BEFORE, EPILOGUE_AFTER),
    (NORM_BEFORE, NORM_AFTER),
    (ILLEGAL_BEFORE, ILLEGAL_AFTER),
    (CONSTS_BEFORE, CONSTS_AFTER),
], ids=["chain", "linear-epilogue", "add-rms-norm", "legality", "constants"])
def test_fusion_ir(before, after):
    assert_pass_output(FuseElementwise(), before, after)


def test_fusing_again_changes_nothing():
    """Fused ops are never members, and new names stay unique among existing ones."""
    assert run_pass_on_text(FuseElementwise(), NORM_AFTER) == NORM_AFTER


def test_registered_with_stats():
    assert isinstance(get_pass("fuse-elementwise"), FuseElementwise)
    fn = parse_module(NORM_AFTER).functions["forward"]
    assert fusion_stats(fn) == {"regions": 2, "fused_ops": 4, "top_level_ops": 6, "layers": 0}


def copy_module(module):
    return parse_module(print_module(module))


def fuse_and_compare(module, weights, vocab, atol):
    """Fuse a copy of ``module``; check it verifies, computes the same logits, and has regions."""
    fused = FuseElementwise().run(copy_module(module))
    verify(fused)
    assert_same_outputs(model_outputs(module, weights, vocab), model_outputs(fused, weights, vocab), atol=atol)
    before, after = fusion_stats(module.functions["forward"]), fusion_stats(fused.functions["forward"])
    assert after["regions"] > 0
    assert after["top_level_ops"] < before["top_level_ops"]
    return after


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_fusion_preserves_outputs_on_tiny_models(arch):
    model = tiny_model(arch)
    imp = import_hf_model(model)
    fuse_and_compare(imp.module, imp.weights, model.config.vocab_size, atol=1e-5)


RECOGNIZERS = ["recognize-rms-norm", "recognize-rope", "recognize-gated-mlp"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_fusion_after_recognition_preserves_outputs(arch):
    try:
        recognizers = [get_pass(name) for name in RECOGNIZERS]
    except PassNotFound as exc:
        pytest.skip(f"recognition passes not available yet: {exc}")
    model = tiny_model(arch)
    imp = import_hf_model(model)
    module = copy_module(imp.module)
    for p in recognizers + [get_pass("dce")]:
        p.run(module)
    verify(module)
    assert_same_outputs(model_outputs(imp.module, imp.weights, model.config.vocab_size),
                        model_outputs(module, imp.weights, model.config.vocab_size), atol=1e-5)
    fuse_and_compare(module, imp.weights, model.config.vocab_size, atol=1e-5)


def test_fusion_on_smollm2(smollm2):
    model, _, imp = smollm2
    stats = fuse_and_compare(imp.module, imp.weights, model.config.vocab_size, atol=1e-4)
    # per layer on the raw import: input norm tail, rope of q and of k, o_proj + residual add,
    # post-attention norm tail, gate + silu * up, down_proj + residual add; plus the rotary
    # cos/sin tables (3) and the final norm tail
    assert stats["layers"] == 30
    assert stats["regions"] == 7 * 30 + 4
