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


ROUTER = """module @m {
  func @forward(%s: f32[T, 8], %i: i64[T, 2], %c: f32[T, 8]) -> (f32[T, 2], f32[T, 8], f32[T, 8], bool[T, 8]) {
    %g = gather(%s, %i) {axis = 1} : f32[T, 2]
    %sc = scatter(%c, %i, %g) {axis = 1} : f32[T, 8]
    %gt = gt(%s, %c) : bool[T, 8]
    %le = le(%s, %c) : bool[T, 8]
    %both = logical_and(%gt, %le) : bool[T, 8]
    %neither = logical_not(%both) : bool[T, 8]
    %w = where(%gt, %s, %c) : f32[T, 8]
    return %g, %sc, %w, %neither
  }
}
"""


def test_router_ops_round_trip_and_mean_what_torch_means():
    module = parse_module(ROUTER)
    verify(module)
    assert print_module(parse_module(print_module(module))) == print_module(module)
    torch.manual_seed(2)
    s, c = torch.randn(5, 8), torch.randn(5, 8)
    i = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    g, sc, w, neither = Interpreter(module, {}).run([s, i, c])
    assert torch.equal(g, torch.gather(s, 1, i))
    assert torch.equal(sc, torch.scatter(c, 1, i, torch.gather(s, 1, i)))
    assert torch.equal(w, torch.where(s > c, s, c))
    assert bool(neither.all())  # s > c and s <= c never both hold


def test_router_op_type_rules():
    with pytest.raises(Exception, match="bool condition"):
        verify(parse_module(ROUTER.replace("where(%gt, %s, %c)", "where(%s, %s, %c)")))
    with pytest.raises(Exception, match="integer tensor"):
        verify(parse_module(ROUTER.replace("gather(%s, %i)", "gather(%s, %c)").replace(
            "f32[T, 2]\n    %sc", "f32[T, 8]\n    %sc")))


def test_attention_sinks_join_the_softmax_denominator():
    text = """module @m {
  func @forward(%q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 8], %p: i64[T], %s: f32[4]) -> (f32[T, 4, 8]) {
    %o = attention(%q, %k, %v, %p, %s) {layer = 0, scale = 0.5, window = 0, softcap = 0.0} : f32[T, 4, 8]
    return %o
  }
}
"""
    module = parse_module(text)
    verify(module)
    torch.manual_seed(4)
    t = 6
    q, k, v, sinks = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8), torch.randn(4)
    got = Interpreter(module, {}).run([q, k, v, torch.arange(t), sinks])[0]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.exp() / (scores.exp().sum(-1, keepdim=True) + sinks.exp()[:, None, None])
    torch.testing.assert_close(got, torch.einsum("hqk,khd->qhd", weights, vv), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="sinks must be"):
        verify(parse_module(text.replace("%s: f32[4]", "%s: f32[3]")))

