"""GPTQ (compiler/gptq.py): lower output error than plain rounding on correlated inputs, the
plain search where the Hessian is diagonal, and the tiny llama through the interpreter."""

import pytest
import torch

from llmc.compiler.gptq import gptq_quantize, shrinkage
from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.ir.quant import code_range, dequantize, quantize_weight, unpack_codes
from llmc.compiler.passes.quantize import Quantize, parse_scheme

from .helpers import model_outputs


def correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """Inputs [t, k] with correlated channels of unequal scale, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(t, k, generator=g) @ mix + 0.3 * torch.randn(t, k, generator=g)
    return x * torch.exp(0.7 * torch.randn(k, generator=g))


def output_error(x, w, packed, scales, bits=4, group=32) -> float:
    q = dequantize(packed, scales, None, bits=bits, group_size=group, signed=True)
    return float(((x @ (w - q).T) ** 2).mean())


@pytest.mark.parametrize("bits,k", [(4, 128), (4, 320), (8, 128)])
def test_gptq_lowers_the_output_error_of_plain_and_weighted_rounding(bits, k):
    x = correlated_inputs(4 * k, k, seed=k)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h = x.double().T @ x.double() / x.shape[0]
    gptq = output_error(x, w, *gptq_quantize(w, h, bits=bits, group_size=32)[:2], bits=bits)
    plain = output_error(x, w, *quantize_weight(w, bits=bits, group_size=32, symmetric=True)[:2], bits=bits)
    weighted = output_error(x, w, *quantize_weight(w, bits=bits, group_size=32, symmetric=True,
                                                   importance=h.diagonal().float())[:2], bits=bits)
    assert gptq < 0.75 * weighted < 0.75 * plain, (gptq, weighted, plain)


def test_layout_matches_the_plain_quantizer_and_codes_are_in_range():
    x = correlated_inputs(256, 64, seed=2)
    w = torch.randn(8, 64)
    codes, scales, mins = gptq_quantize(w, x.T @ x, bits=4, group_size=32)
    ref = quantize_weight(w, bits=4, group_size=32, symmetric=True)
    assert mins is None and codes.shape == ref[0].shape and codes.dtype == ref[0].dtype
    assert scales.shape == ref[1].shape and scales.dtype == torch.float16
    lo, hi = code_range(4, True)
    c = unpack_codes(codes, 4, True)
    assert int(c.min()) >= lo and int(c.max()) <= hi


def test_diagonal_hessian_is_the_weighted_search():
    """No off-diagonal terms: nothing to feed back, so GPTQ is the importance-weighted search
    (the same with full shrinkage)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 96, generator=g)
    d = torch.rand(96, generator=g) + 0.1
    ref = quantize_weight(w, bits=4, group_size=32, symmetric=True, importance=d)
    got = gptq_quantize(w, torch.diag(d), bits=4, group_size=32, damp=0.0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    x = correlated_inputs(200, 96, seed=6)
    h = x.double().T @ x.double()
    shrunk = gptq_quantize(w, h, bits=4, group_size=32, damp=0.0, shrink=1.0)
    ref = quantize_weight(w, bits=4, group_size=32, symmetric=True, importance=h.diagonal().float())
    assert torch.equal(shrunk[0], ref[0]) and torch.equal(shrunk[1], ref[1])


def test_shrinkage_pulls_a_noisy_hessian_toward_its_diagonal():
    assert shrinkage(576, 0) == 1.0 and shrinkage(576, 576) == 0.5 and shrinkage(100, 9900) == 0.01
    # few tokens per channel: the unshrunk Hessian overfits, held-out error is lower shrunk
    k = 192
    x_fit, x_new = correlated_inputs(2 * k, k, seed=7), correlated_inputs(4000, k, seed=7)[2 * k:]
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(8)) * 0.05
    h = x_fit.double().T @ x_fit.double()
    raw = output_error(x_new, w, *gptq_quantize(w, h, bits=4, group_size=32)[:2])
    shrunk = output_error(x_new, w, *gptq_quantize(w, h, bits=4, group_size=32, shrink=shrinkage(k, 2 * k))[:2])
    assert shrunk < raw


def test_dead_channels_and_bad_hessians():
    x = correlated_inputs(128, 64, seed=9)
    x[:, 5] = 0  # a channel never active in calibration
    w = torch.randn(8, 64)
    codes, scales, _ = gptq_quantize(w, x.T @ x, bits=4, group_size=32)
    assert torch.isfinite(scales.float()).all()
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_quantize(w, torch.eye(32), bits=4, group_size=32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        gptq_quantize(torch.randn(8, 48), torch.eye(48), bits=4, group_size=32)


@pytest.fixture(scope="module")
def tied_llama():
    from llmc.compiler.frontend import import_hf_model
    from tests.tiny_models import tiny_model

    return import_hf_model(tiny_model("llama_tied"))


def test_tiny_llama_gptq_through_the_interpreter(tied_llama):
    """Hessians from the interpreter on calibration tokens, then the pass: every linear's
    Hessian-weighted error (its output error on the calibration inputs) is below plain
    rounding's, and the model's outputs on other tokens stay within int4 error."""
    from llmc.compiler.calibration import linear_hessians

    imported = tied_llama
    calib = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(11)).tolist()
    hessians = linear_hessians(imported.module, imported.weights, calib, window=100)
    assert len(hessians) == 2 * 7 + 1
    scheme = parse_scheme("q4_g32")
    provider = scheme.provider(None, hessians, len(calib))
    for name, h in hessians.items():
        w = imported.weights[name]
        err = {kind: float(torch.trace((w - q.dequantize()).double() @ h @ (w - q.dequantize()).double().T))
               for kind, q in (("plain", scheme.quantize(name, w)), ("gptq", provider(name, w)))}
        assert err["gptq"] < err["plain"], (name, err)
    before = model_outputs(imported.module, imported.weights, 128, seed=3)
    module = parse_module(print_module(imported.module))
    weights = dict(imported.weights)
    Quantize(weights, provider).run(module)
    verify(module)
    kinds = [op.kind for op in module.functions["forward"].ops]
    assert kinds.count("quantized_linear") == 2 * 7 + 1 and "linear" not in kinds
    after = model_outputs(module, weights, 128, seed=3)
    for a, b in zip(before, after):
        assert 0 < float((a - b).norm() / a.norm()) < 0.25
