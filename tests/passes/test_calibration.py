"""--quant-calibration: per-input-channel mean x^2 of each linear, from the reference interpreter."""

import pytest
import torch

from llmc.compiler.calibration import linear_importance, read_calibration_tokens
from llmc.compiler.ir import parse_module
from llmc.compiler.passes.quantize import Quantize, parse_scheme

MODULE = """module @m {
  param @e : f32[10, 64]
  param @w : f32[8, 64]
  func @forward(%input_ids: i64[T], %positions: i64[T]) -> (f32[T, 8]) {
    %e = param() {name = "e"} : f32[10, 64]
    %w = param() {name = "w"} : f32[8, 64]
    %h = embedding(%e, %input_ids) : f32[T, 64]
    %y = linear(%h, %w) : f32[T, 8]
    return %y
  }
}
"""


def test_importance_is_mean_square_of_the_linear_input_over_all_windows():
    g = torch.Generator().manual_seed(3)
    weights = {"e": torch.randn(10, 64, generator=g), "w": torch.randn(8, 64, generator=g)}
    ids = torch.randint(0, 10, (11,), generator=g)
    imp = linear_importance(parse_module(MODULE), weights, ids.tolist(), window=4)  # windows 4 + 4 + 3
    assert set(imp) == {"w"}
    torch.testing.assert_close(imp["w"], (weights["e"][ids] ** 2).mean(0))


def test_calibrated_provider_weights_the_search():
    g = torch.Generator().manual_seed(4)
    weights = {"e": torch.randn(10, 64, generator=g), "w": torch.randn(8, 64, generator=g)}
    weights["e"][:, ::2] *= 30  # even channels carry most of the activation energy
    imp = linear_importance(parse_module(MODULE), weights, list(range(10)))
    scheme = parse_scheme("q4_g32")
    plain, calibrated = scheme.quantize("w", weights["w"]), scheme.provider(imp)("w", weights["w"])
    x = weights["e"]
    err = {k: ((x @ weights["w"].T - x @ q.dequantize().T) ** 2).sum() for k, q in (("p", plain), ("c", calibrated))}
    assert err["c"] < err["p"]  # the output error falls where the inputs are large
    module = parse_module(MODULE)
    Quantize(dict(weights), scheme.provider(imp)).run(module)
    assert "quantized_linear" in [op.kind for op in module.functions["forward"].ops]


def test_unreadable_or_empty_calibration_text_is_refused(tmp_path):
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="cannot read it"):
        read_calibration_tokens(str(tmp_path / "missing.txt"), Tok())
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        read_calibration_tokens(str(tmp_path / "empty.txt"), Tok())
    (tmp_path / "a.txt").write_text("ab")
    assert read_calibration_tokens(str(tmp_path / "a.txt"), Tok()) == [97, 98]


def test_calibration_without_a_scheme_is_refused():
    from llmc.compiler.driver import quantize_pass

    with pytest.raises(ValueError, match="pick a scheme"):
        quantize_pass("gguf", None, "smollm2", "cpu", calibration=[1, 2, 3])


def test_hessians_are_mean_outer_products_and_their_diagonal_the_importance():
    from llmc.compiler.calibration import linear_hessians

    g = torch.Generator().manual_seed(5)
    weights = {"e": torch.randn(10, 64, generator=g), "w": torch.randn(8, 64, generator=g)}
    ids = torch.randint(0, 10, (11,), generator=g)
    hs = linear_hessians(parse_module(MODULE), weights, ids.tolist(), window=4)
    x = weights["e"][ids].double()
    assert set(hs) == {"w"} and hs["w"].dtype == torch.float64
    torch.testing.assert_close(hs["w"], x.T @ x / len(ids))
    imp = linear_importance(parse_module(MODULE), weights, ids.tolist(), window=4)
    torch.testing.assert_close(hs["w"].diagonal().float(), imp["w"])


def test_unknown_quant_method_is_refused():
    from llmc.compiler.driver import quantize_pass

    with pytest.raises(ValueError, match="choose one of gptq, search"):
        quantize_pass("q4_g32", None, "smollm2", "cpu", calibration=[1, 2, 3], method="awq")
