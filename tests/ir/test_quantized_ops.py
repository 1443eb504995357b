"""quantized_linear / quantized_embedding: type rules, text form, interpreter meaning."""

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.ir import (Builder, Function, Interpreter, Module, TensorType, VerifyError, parse_module,
                              print_module, symbol, verify)
from llmc.compiler.ir.quant import codes_cols, codes_dtype, dequantize, quantize_weight

T = symbol("T")
N, K = 24, 128


def quant_module(bits, group, symmetric, op="quantized_linear", n=N, k=K, scale_dtype="f16"):
    m = Module("q")
    signed = symmetric
    m.add_param("w.codes", TensorType((n, codes_cols(k, bits)), codes_dtype(bits, signed)))
    m.add_param("w.scales", TensorType((n, k // group), scale_dtype))
    if not symmetric:
        m.add_param("w.mins", TensorType((n, k // group), scale_dtype))
    b = Builder(m)
    if op == "quantized_linear":
        x = b.arg("x", TensorType((T, k), "f32"))
    else:
        x = b.arg("ids", TensorType((T,), "i64"))
    ws = [b.op("param", name="w.codes"), b.op("param", name="w.scales")]
    if not symmetric:
        ws.append(b.op("param", name="w.mins"))
    b.ret(b.op(op, x, *ws, bits=bits, group_size=group, signed=signed))
    m.add_function(Function("forward", b.block))
    return m


def weights_for(w, bits, group, symmetric):
    codes, scales, mins = quantize_weight(w, bits=bits, group_size=group, symmetric=symmetric)
    out = {"w.codes": codes, "w.scales": scales}
    if mins is not None:
        out["w.mins"] = mins
    return out, dequantize(codes, scales, mins, bits=bits, group_size=group, signed=symmetric)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (8, 32, True), (8, 128, False)])
def test_quantized_linear_means_dequantize_then_linear(bits, group, symmetric):
    m = quant_module(bits, group, symmetric)
    verify(m)
    text = print_module(m)
    assert "quantized_linear(" in text and f"bits = {bits}" in text
    assert print_module(parse_module(text)) == text
    g = torch.Generator().manual_seed(bits * group + symmetric)
    w = torch.randn(N, K, generator=g)
    weights, deq = weights_for(w, bits, group, symmetric)
    x = torch.randn(5, K, generator=g)
    (y,) = Interpreter(m, weights).run([x])
    torch.testing.assert_close(y, F.linear(x, deq))
    # the scheme's error: relative RMS of round-to-nearest with 2^bits levels per group
    rel = ((deq - w).pow(2).mean().sqrt() / w.std()).item()
    assert rel < (0.11 if bits == 4 else 0.007), rel
    assert rel > 0
    if not symmetric:  # min/max grid: every weight within half a step (+ fp16 rounding of scale and min)
        grouped = w.reshape(N, -1, group)
        step = (grouped.amax(-1) - grouped.amin(-1)) / ((1 << bits) - 1)
        bound = step.repeat_interleave(group, dim=1) * 0.51 + 2e-3 * w.abs().max()
        assert bool(((deq - w).abs() <= bound).all())


def test_quantized_embedding_gathers_dequantized_rows():
    m = quant_module(4, 32, False, op="quantized_embedding", n=50, k=64)
    verify(m)
    w = torch.randn(50, 64)
    weights, deq = weights_for(w, 4, 32, False)
    ids = torch.tensor([3, 0, 49, 3])
    (y,) = Interpreter(m, weights).run([ids])
    assert y.dtype == torch.float32 and torch.equal(y, deq[ids])


def test_verifier_names_bad_layouts():
    m = quant_module(4, 32, True)
    op = [o for o in m.functions["forward"].ops if o.kind == "quantized_linear"][0]
    op.attrs["group_size"] = 64  # scales no longer match the codes
    with pytest.raises(VerifyError, match="do not match scales"):
        verify(m)
    op.attrs["group_size"] = 32
    op.attrs["bits"] = 3
    with pytest.raises(VerifyError, match="bits must be 4, 5, 6 or 8"):
        verify(m)
    op.attrs["bits"] = 8
    with pytest.raises(VerifyError, match="codes must be i8"):  # i8 [N, K] for signed 8-bit
        verify(m)


IQ4 = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def codebook_module(codebook, bits=4, signed=False, op="quantized_linear"):
    m = Module("q")
    m.add_param("w.codes", TensorType((N, codes_cols(K, bits)), codes_dtype(bits, signed)))
    m.add_param("w.scales", TensorType((N, K // 32), "f32"))
    b = Builder(m)
    x = b.arg("x", TensorType((T, K), "f32")) if op == "quantized_linear" else b.arg("ids", TensorType((T,), "i64"))
    ws = [b.op("param", name="w.codes"), b.op("param", name="w.scales")]
    b.ret(b.op(op, x, *ws, bits=bits, group_size=32, signed=signed, codebook=codebook))
    m.add_function(Function("forward", b.block))
    return m


@pytest.mark.parametrize("op", ["quantized_linear", "quantized_embedding"])
def test_codebook_codes_index_their_values(op):
    """With a codebook (IQ4_NL/IQ4_XS, MXFP4) the 4-bit code is an index: w = scale * codebook[code];
    the attribute survives the text form."""
    m = codebook_module(IQ4, op=op)
    verify(m)
    again = parse_module(print_module(m))
    assert print_module(again) == print_module(m)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    codes = (idx[:, 0::2] | (idx[:, 1::2] << 4)).to(torch.uint8)
    scales = torch.randn(N, K // 32, generator=g)
    w = scales.repeat_interleave(32, dim=1) * torch.tensor(IQ4, dtype=torch.float32)[idx.long()]
    assert torch.equal(dequantize(codes, scales, None, bits=4, group_size=32, signed=False, codebook=IQ4), w)
    weights = {"w.codes": codes, "w.scales": scales}
    if op == "quantized_linear":
        x = torch.randn(5, K, generator=g)
        (got,) = Interpreter(again, weights).run([x])
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)
    else:
        ids = torch.tensor([3, 0, N - 1])
        (got,) = Interpreter(again, weights).run([ids])
        assert torch.equal(got, w[ids])


@pytest.mark.parametrize("book,bits,signed,why", [(IQ4, 8, True, "codebook must be 16 int8 values"),
                                                  (IQ4, 4, True, "unsigned 4-bit"),
                                                  (IQ4[:8], 4, False, "got 8 values"),
                                                  ([300] + IQ4[1:], 4, False, "16 int8 values")])
def test_a_codebook_needs_unsigned_4_bit_codes_and_16_int8_values(book, bits, signed, why):
    with pytest.raises((TypeError, VerifyError), match=why):
        verify(codebook_module(book, bits=bits, signed=signed))
