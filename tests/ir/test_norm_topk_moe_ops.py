"""layer_norm, topk and moe: text form round trip, type rules, and interpreter meanings
against independent torch references."""

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.ir import Interpreter, parse_module, print_module, verify
from llmc.compiler.ir.interpreter import moe_reference

TEXT = """module @m {
  param @w : f32[16]
  param @b : f32[16]
  param @up : f32[4, 24, 16]
  param @down : f32[4, 16, 12]
  func @forward(%x: f32[T, 16], %logits: f32[T, 4]) -> (f32[T, 16], f32[T, 16], f32[T, 2], i64[T, 2], f32[T, 16]) {
    %w = param() {name = "w"} : f32[16]
    %b = param() {name = "b"} : f32[16]
    %ln = layer_norm(%x, %w, %b) {eps = 1e-05} : f32[T, 16]
    %ln0 = layer_norm(%x) {eps = 1e-05} : f32[T, 16]
    %probs = softmax(%logits) {axis = 1} : f32[T, 4]
    %top, %top_1 = topk(%probs) {k = 2} : f32[T, 2], i64[T, 2]
    %up = param() {name = "up"} : f32[4, 24, 16]
    %down = param() {name = "down"} : f32[4, 16, 12]
    %y = moe(%ln, %top_1, %top, %up, %down) {activation = "silu", gated = true} : f32[T, 16]
    return %ln, %ln0, %top, %top_1, %y
  }
}
"""


def test_text_form_round_trips_and_verifies():
    module = parse_module(TEXT)
    verify(module)
    assert print_module(parse_module(print_module(module))) == print_module(module)


@pytest.mark.parametrize("bad, message", [
    ("%ln = layer_norm(%x, %w, %b) {eps = 1e-05} : f32[T, 16]".replace("%b)", "%b, %b)"), "optional weight"),
    ("{k = 2} : f32[T, 2], i64[T, 2]", "k=5"),
    ('{activation = "silu", gated = true}', "activation"),
    ('{activation = "silu", gated = true}', "up rows"),
])
def test_type_rules_refuse_bad_ops(bad, message):
    text = TEXT
    if message == "k=5":
        text = text.replace("{k = 2} : f32[T, 2], i64[T, 2]", "{k = 5} : f32[T, 5], i64[T, 5]")
    elif message == "activation":
        text = text.replace('activation = "silu"', 'activation = "swish"')
    elif message == "up rows":
        text = text.replace("gated = true", "gated = false")
    else:
        text = text.replace("%ln = layer_norm(%x, %w, %b)", "%ln = layer_norm(%x, %w, %b, %b)")
    with pytest.raises(Exception, match=message):
        verify(parse_module(text))


def test_meanings_match_torch():
    torch.manual_seed(0)
    module = parse_module(TEXT)
    weights = {"w": torch.randn(16), "b": torch.randn(16), "up": torch.randn(4, 24, 16), "down": torch.randn(4, 16, 12)}
    x, logits = torch.randn(7, 16), torch.randn(7, 4)
    logits[3] = 0.5  # a row of ties: topk takes the lower indices first
    ln, ln0, top, idx, y = Interpreter(module, weights).run([x, logits])
    torch.testing.assert_close(ln, F.layer_norm(x, (16,), weights["w"], weights["b"], 1e-5))
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln0, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    want_top, want_idx = torch.softmax(logits, -1).topk(2, dim=-1)
    torch.testing.assert_close(top, want_top)
    assert torch.equal(idx[[0, 1, 2, 4, 5, 6]], want_idx[[0, 1, 2, 4, 5, 6]])
    assert idx[3].tolist() == [0, 1]
    # moe: every expert computed densely, then masked by the routing, as an independent reference
    dense = torch.zeros(7, 16)
    for e in range(4):
        g, u = F.linear(ln, weights["up"][e]).chunk(2, dim=-1)
        out_e = F.linear(F.silu(g) * u, weights["down"][e])
        gate = (top * (idx == e)).sum(-1, keepdim=True)
        dense += gate * out_e
    torch.testing.assert_close(y, dense, atol=1e-4, rtol=1e-4)


def test_moe_ungated_with_biases():
    torch.manual_seed(1)
    x, ids = torch.randn(5, 8), torch.randint(0, 3, (5, 2))
    w = torch.rand(5, 2)
    up, down, ub, db = torch.randn(3, 6, 8), torch.randn(3, 8, 6), torch.randn(3, 6), torch.randn(3, 8)
    got = moe_reference(x, ids, w, up, down, ub, db, activation="gelu", gated=False)
    want = torch.stack([sum(w[t, k] * F.linear(F.gelu(F.linear(x[t], up[ids[t, k]], ub[ids[t, k]])), down[ids[t, k]],
                                               db[ids[t, k]]) for k in range(2)) for t in range(5)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
