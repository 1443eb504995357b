"""The quantize pass: before/after IR, weights, and interpreter equivalence within the scheme's error."""

import pytest
import torch

from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.ir.quant import QuantWeight
from llmc.compiler.passes.quantize import SCHEMES, Quantize, parse_scheme

from .helpers import model_outputs

BEFORE = """module @m {
  param @w : f32[8, 64]
  param @b : f32[8]
  param @e : f32[10, 64]
  func @forward(%x: f32[T, 64], %ids: i64[T]) -> (f32[T, 8], f32[T, 64]) {
    %w = param() {name = "w"} : f32[8, 64]
    %b = param() {name = "b"} : f32[8]
    %e = param() {name = "e"} : f32[10, 64]
    %y = linear(%x, %w, %b) : f32[T, 8]
    %h = embedding(%e, %ids) : f32[T, 64]
    return %y, %h
  }
}
"""

AFTER = """module @m {
  param @b : f32[8] {origin = "parameter"}
  param @w.codes : u8[8, 32] {origin = "quantized:w:q4a_g64"}
  param @w.scales : f16[8, 1] {origin = "quantized:w:q4a_g64"}
  param @w.mins : f16[8, 1] {origin = "quantized:w:q4a_g64"}
  param @e.codes : u8[10, 32] {origin = "quantized:e:q4a_g64"}
  param @e.scales : f16[10, 1] {origin = "quantized:e:q4a_g64"}
  param @e.mins : f16[10, 1] {origin = "quantized:e:q4a_g64"}
  func @forward(%x: f32[T, 64], %ids: i64[T]) -> (f32[T, 8], f32[T, 64]) {
    %b = param() {name = "b"} : f32[8]
    %w.codes = param() {name = "w.codes"} : u8[8, 32]
    %w.scales = param() {name = "w.scales"} : f16[8, 1]
    %w.mins = param() {name = "w.mins"} : f16[8, 1]
    %y_q = quantized_linear(%x, %w.codes, %w.scales, %w.mins) {bits = 4, group_size = 64, signed = false} : f32[T, 8]
    %y_b = add(%y_q, %b) : f32[T, 8]
    %e.codes = param() {name = "e.codes"} : u8[10, 32]
    %e.scales = param() {name = "e.scales"} : f16[10, 1]
    %e.mins = param() {name = "e.mins"} : f16[10, 1]
    %h_q = quantized_embedding(%ids, %e.codes, %e.scales, %e.mins) {bits = 4, group_size = 64, signed = false} : f32[T, 64]
    return %y_b, %h_q
  }
}
"""


def test_before_after_text_and_weights():
    m = parse_module(BEFORE)
    weights = {"w": torch.randn(8, 64), "b": torch.randn(8), "e": torch.randn(10, 64)}
    scheme = parse_scheme("q4a_g64")
    Quantize(weights, scheme.quantize, embedding=True).run(m)
    verify(m)
    got = print_module(m)
    assert got == AFTER, got
    assert sorted(weights) == sorted(["b", "w.codes", "w.scales", "w.mins", "e.codes", "e.scales", "e.mins"])
    assert weights["w.codes"].dtype == torch.uint8 and weights["w.scales"].dtype == torch.float16


def test_gguf_style_provider_and_declined_weights_stay_float():
    m = parse_module(BEFORE)
    w = torch.randn(8, 64)
    weights = {"w": w, "b": torch.randn(8), "e": torch.randn(10, 64)}
    given = SCHEMES["q8_g32"].quantize("w", w)
    Quantize(weights, lambda name, t: given if name == "w" else None, embedding=True).run(m)
    verify(m)
    text = print_module(m)
    assert "embedding(%e, %ids)" in text and "quantized_linear" in text and "bits = 8" in text
    assert weights["w.codes"] is given.codes and "e" in weights and "w" not in weights


def test_unknown_scheme_names_choices():
    with pytest.raises(ValueError, match="q4_g32"):
        parse_scheme("q3_g32")
    assert isinstance(SCHEMES["q4_g32"].quantize("x", torch.randn(4, 64)), QuantWeight)
    assert SCHEMES["q4_g128"].quantize("x", torch.randn(4, 64)) is None  # K not a multiple of the group


# scheme -> allowed relative error of the logits (int8 is near exact; int4 g32 is coarse)
TOLERANCE = {"q8_g32": 0.02, "q8a_g32": 0.02, "q4_g32": 0.25, "q4a_g64": 0.25}


@pytest.fixture(scope="module")
def tied_llama():
    from llmc.compiler.frontend import import_hf_model
    from tests.tiny_models import tiny_model

    return import_hf_model(tiny_model("llama_tied"))


@pytest.mark.parametrize("scheme", sorted(TOLERANCE))
def test_tiny_llama_keeps_outputs_within_scheme_error(scheme, tied_llama):
    imported = tied_llama
    before = model_outputs(imported.module, imported.weights, 128)
    module = parse_module(print_module(imported.module))
    weights = dict(imported.weights)
    Quantize(weights, parse_scheme(scheme).quantize).run(module)
    verify(module)
    kinds = [op.kind for op in module.functions["forward"].ops]
    if parse_scheme(scheme).group_size == 32:
        assert kinds.count("quantized_linear") == 2 * 7 + 1 and "linear" not in kinds  # 7 per layer + lm head
    else:  # down_proj's K = 96 is no multiple of 64: it stays float
        assert kinds.count("quantized_linear") == 2 * 6 + 1 and kinds.count("linear") == 2
    assert "embedding" in kinds  # the tied table stays float for the gather
    after = model_outputs(module, weights, 128)
    for a, b in zip(before, after):
        rel = (a - b).norm() / a.norm()
        assert rel < TOLERANCE[scheme], f"{scheme}: relative error {rel:.4f}"
        assert rel > 0  # the weights really changed
