"""The recurrent-state ops' meanings against independent torch references (F.conv1d and
transformers' chunked gated delta rule), state carried across steps, the paged _step forms
over slots, and their type rules."""

import pytest
import torch
import torch.nn.functional as F

from llmc.compiler.ir import Interpreter, KVCache, parse_module, print_module, verify
from llmc.compiler.ir.recurrent import sequence_reference, step_reference


def _conv_torch(x, w, bias):
    """x [T, C], w [C, K]: HF's causal_conv1d_fn fallback."""
    t, c = x.shape
    return F.conv1d(x.T[None], w[:, None], bias, padding=w.shape[1] - 1, groups=c)[0, :, :t].T


def _rule_torch(q, k, v, g, beta):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    out, _ = torch_chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], chunk_size=4)
    return out[0]


def _rule_inputs(t, h=3, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(t, h, dk, generator=g), F.normalize(torch.randn(t, h, dk, generator=g), dim=-1)
    v = torch.randn(t, h, dv, generator=g)
    gate = -torch.rand(t, h, generator=g)
    beta = torch.rand(t, h, generator=g)
    return q, k, v, gate, beta


def test_conv_meaning_matches_torch_and_carries_state():
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(11, 5, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    want = _conv_torch(x, w, bias)
    states = {}
    got = [sequence_reference("causal_conv1d", [x[:6], w, bias], torch.arange(6), states, 0)]
    for i in range(6, 11):  # then one token at a time
        got.append(sequence_reference("causal_conv1d", [x[i:i + 1], w, bias], torch.tensor([i]), states, 0))
    assert torch.allclose(torch.cat(got), want, atol=1e-5)


def test_delta_rule_meaning_matches_transformers_chunked_scan():
    q, k, v, gate, beta = _rule_inputs(10)
    want = _rule_torch(q, k, v, gate, beta) * 1.0
    # HF's kernel scales q by dk^-0.5 itself; the IR op takes q already scaled
    states = {}
    qs = q * q.shape[-1] ** -0.5
    a = sequence_reference("gated_delta_rule", [qs[:7], k[:7], v[:7], gate[:7], beta[:7]], torch.arange(7), states, 3)
    b = sequence_reference("gated_delta_rule", [qs[7:], k[7:], v[7:], gate[7:], beta[7:]], torch.arange(7, 10),
                           states, 3)
    assert torch.allclose(torch.cat([a, b]), want, atol=1e-4)


def test_step_forms_run_each_sequence_in_its_own_slot():
    q, k, v, gate, beta = _rule_inputs(9, seed=2)
    # sequence 0: 5 fresh tokens in slot 2; sequence 1: continues (2 tokens after 3 earlier ones) in slot 0
    pool = torch.zeros(4, 3, 8, 6)
    states = {}
    sequence_reference("gated_delta_rule", [t[:3] for t in (q, k, v, gate, beta)], torch.arange(3), states, 0)
    pool[0] = states[0][0]
    pool[2] = torch.randn(3, 8, 6)  # garbage a fresh sequence must ignore
    rows = [torch.cat([t[:5], u[3:5]]) for t, u in zip((q, k, v, gate, beta), (q, k, v, gate, beta))]
    out, new = step_reference("gated_delta_rule_step", pool, rows, torch.tensor([2, 0]), torch.tensor([5, 5]),
                              torch.tensor([0, 5, 7]))
    fresh = sequence_reference("gated_delta_rule", [t[:5] for t in (q, k, v, gate, beta)], torch.arange(5), {}, 0)
    cont = sequence_reference("gated_delta_rule", [t[3:5] for t in (q, k, v, gate, beta)], torch.arange(3, 5),
                              states, 0)
    assert torch.allclose(out[:5], fresh, atol=1e-6) and torch.allclose(out[5:], cont, atol=1e-6)
    assert torch.allclose(new[0], states[0][0]) and torch.equal(new[1], pool[1])


TEXT = """module @m {
  func @forward(%x: f32[T, 6], %w: f32[6, 4], %positions: i64[T]) -> (f32[T, 6]) {
    %y = causal_conv1d(%x, %w, %positions) {state = 0} : f32[T, 6]
    return %y
  }
}"""


def test_text_form_and_interpreter_state_across_calls():
    module = parse_module(TEXT)
    verify(module)
    assert parse_module(print_module(module)).functions["forward"].ops[0].kind == "causal_conv1d"
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 6, generator=g), torch.randn(6, 4, generator=g)
    interp = Interpreter(module, {}, KVCache())
    a = interp.run({"x": x[:4], "w": w, "positions": torch.arange(4)})[0]
    b = interp.run({"x": x[4:], "w": w, "positions": torch.arange(4, 7)})[0]
    assert torch.allclose(torch.cat([a, b]), _conv_torch(x, w, None), atol=1e-5)
    with pytest.raises(Exception, match="state 0"):
        interp.run({"x": x[:1], "w": w, "positions": torch.tensor([9])})


def test_type_rules_name_the_problem():
    bad = TEXT.replace("%w: f32[6, 4]", "%w: f32[5, 4]")
    with pytest.raises(Exception, match="channel"):
        verify(parse_module(bad))
