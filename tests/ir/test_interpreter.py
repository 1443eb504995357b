"""The interpreter's attention (the KV-cache boundary) against an independent reference."""

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.ir import Interpreter, InterpreterError, KVCache, parse_module
from llmc.compiler.ir.interpreter import attention_reference

ATTN = """module @m {
  func @forward(%q: f32[T, 4, 16], %k: f32[T, 2, 16], %v: f32[T, 2, 16], %p: i64[T]) -> (f32[T, 4, 16]) {
    %o = attention(%q, %k, %v, %p) {layer = 0, scale = 0.25, window = WINDOW, softcap = SOFTCAP} : f32[T, 4, 16]
    return %o
  }
}
"""


def sdpa_reference(q, k, v, scale, window, softcap):
    """Plain causal attention over a whole sequence, written independently of the interpreter."""
    t = q.shape[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if softcap == 0:
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        if window:
            mask &= ~torch.ones(t, t, dtype=torch.bool).tril(-window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=scale)
        return out.transpose(0, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = softcap * torch.tanh(s / softcap)
    i = torch.arange(t)
    bad = (i[None, :] > i[:, None]) | ((i[:, None] - i[None, :]) >= window if window else False)
    return torch.einsum("hqk,khd->qhd", s.masked_fill(bad, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (5, 0.0), (0, 20.0), (4, 10.0)])
def test_attention_prefill_then_decode_matches_full_sequence(window, softcap):
    torch.manual_seed(window * 7 + int(softcap))
    t = 13
    q, k, v = torch.randn(t, 4, 16), torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    want = sdpa_reference(q, k, v, 0.25, window, softcap)
    module = parse_module(ATTN.replace("WINDOW", str(window)).replace("SOFTCAP", repr(softcap)))
    full = Interpreter(module, {}).run([q, k, v, torch.arange(t)])[0]
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)
    # the same sequence in three steps: a prefill chunk, a second chunk, then single tokens
    interp = Interpreter(module, {}, KVCache(capacity=4))  # small capacity forces growth
    pieces = []
    for lo, hi in [(0, 6), (6, 11), (11, 12), (12, 13)]:
        pieces.append(interp.run([q[lo:hi], k[lo:hi], v[lo:hi], torch.arange(lo, hi)])[0])
    torch.testing.assert_close(torch.cat(pieces), want, atol=1e-5, rtol=1e-5)


def test_attention_refuses_unwritten_positions():
    module = parse_module(ATTN.replace("WINDOW", "0").replace("SOFTCAP", "0.0"))
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    with pytest.raises(InterpreterError, match="no step has written"):
        Interpreter(module, {}).run([q, k, v, torch.tensor([5])])


def test_interpreter_checks_argument_shapes():
    module = parse_module(ATTN.replace("WINDOW", "0").replace("SOFTCAP", "0.0"))
    q, k, v = torch.randn(3, 4, 16), torch.randn(2, 2, 16), torch.randn(3, 2, 16)
    with pytest.raises(InterpreterError, match="bound to both 3 and 2"):
        Interpreter(module, {}).run([q, k, v, torch.arange(3)])


def test_attention_reference_direct_gqa_groups():
    torch.manual_seed(1)
    q, k, v = torch.randn(5, 6, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    got = attention_reference(q, k, v, torch.arange(5), KVCache(), 0, 0.3, 0, 0.0)
    want = sdpa_reference(q, k, v, 0.3, 0, 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
