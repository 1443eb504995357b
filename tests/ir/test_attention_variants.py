"""The attention op's mask and bias variants against hand-written torch: chunked attention
(Llama 4) and ALiBi (Bloom, MPT), through the text form and the verifier, for the plain op and
after the paged-kv pass (paged_attention must mean the same)."""

import pytest
import torch

from llmc.compiler.ir import Interpreter, parse_module, print_module, verify
from llmc.compiler.passes.paged_kv import PagedKV


def test_chunked_attention_sees_only_its_own_chunk():
    text = """module @m {
  func @forward(%q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 8], %p: i64[T]) -> (f32[T, 4, 8]) {
    %o = attention(%q, %k, %v, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0, chunk = 3} : f32[T, 4, 8]
    return %o
  }
}
"""
    module = parse_module(text)
    verify(module)
    assert "chunk = 3" in print_module(module)
    torch.manual_seed(5)
    t = 8
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    got = Interpreter(module, {}).run([q, k, v, torch.arange(t)])[0]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    i = torch.arange(t)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] // 3 == i[:, None] // 3)
    scores = (torch.einsum("qhd,khd->hqk", q, kk) * 0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(got, torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="chunk must be"):
        verify(parse_module(text.replace("chunk = 3", "chunk = -1")))


ALIBI = """module @m {
  func @forward(%q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 8], %p: i64[T]) -> (f32[T, 4, 8]) {
    %o = attention(%q, %k, %v, %p) {layer = 0, scale = 0.5, window = 0, softcap = 0.0, alibi = [0.5, 0.25, 0.125, 0.0625]} : f32[T, 4, 8]
    return %o
  }
}
"""


def test_alibi_adds_a_per_head_linear_distance_bias():
    module = parse_module(ALIBI)
    verify(module)
    assert "alibi = [0.5, 0.25, 0.125, 0.0625]" in print_module(module)
    torch.manual_seed(6)
    t = 7
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    got = Interpreter(module, {}).run([q, k, v, torch.arange(t)])[0]
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    i = torch.arange(t)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.5 + slopes[:, None, None] * (i[None, :] - i[:, None])[None]
    scores = scores.masked_fill(~(i[None, :] <= i[:, None]), float("-inf"))
    torch.testing.assert_close(got, torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="one slope per query head"):
        verify(parse_module(ALIBI.replace(", 0.0625]", "]")))


def _step_module(attrs: str) -> str:
    return """module @m {
  param @wq : f32[16, 32]
  param @wk : f32[16, 16]
  param @wo : f32[32, 16]
  func @forward(%input_ids: i64[T], %positions: i64[T]) -> (f32[T, 16]) {
    %wq = param() {name = "wq"} : f32[16, 32]
    %wk = param() {name = "wk"} : f32[16, 16]
    %q2 = embedding(%wq, %input_ids) : f32[T, 32]
    %k2 = embedding(%wk, %input_ids) : f32[T, 16]
    %q = reshape(%q2) {shape = [T, 4, 8]} : f32[T, 4, 8]
    %k = reshape(%k2) {shape = [T, 2, 8]} : f32[T, 2, 8]
    %o = attention(%q, %k, %k, %positions) {layer = 0, scale = 0.5, window = 0, softcap = 0.0, ATTRS} : f32[T, 4, 8]
    %y = reshape(%o) {shape = [T, 32]} : f32[T, 32]
    %wo = param() {name = "wo"} : f32[32, 16]
    %logits = matmul(%y, %wo) : f32[T, 16]
    return %logits
  }
}
""".replace("ATTRS", attrs)


@pytest.mark.parametrize("attrs", ["chunk = 5", "alibi = [0.5, 0.25, 0.125, 0.0625]"])
def test_paged_kv_carries_chunk_and_alibi(attrs):
    """paged-kv keeps the attribute, and the paged step over mixed batches with shuffled blocks
    equals each sequence run alone through the attention op."""
    from tests.paged import check_mixed_batches

    text = _step_module(attrs)
    before, after = parse_module(text), parse_module(text)
    verify(before)
    module = PagedKV(block_size=4).run(after)
    verify(module)
    paged = [op for op in module.functions["forward"].ops if op.kind == "paged_attention"]
    key = attrs.split(" =")[0]
    assert len(paged) == 1 and key in paged[0].attrs
    g = torch.Generator().manual_seed(3)
    weights = {"wq": torch.randn(16, 32, generator=g), "wk": torch.randn(16, 16, generator=g),
               "wo": torch.randn(32, 16, generator=g)}
    check_mixed_batches(before, module, weights, vocab=16, atol=1e-4)


@pytest.mark.parametrize("attrs,name", [("chunk = 5", "chunked attention"), ("alibi = [0.5, 0.25, 0.125, 0.0625]", "ALiBi")])
def test_triton_plan_refuses_attention_variants_by_name(attrs, name):
    """The cuda/rocm kernels have neither: the plan says so instead of dropping the attribute."""
    pytest.importorskip("triton")
    from llmc.compiler.codegen.triton.emit import CodegenError
    from llmc.compiler.codegen.triton.plan import PlanOptions, lower_to_plan

    module = PagedKV(block_size=16).run(parse_module(_step_module(attrs)))
    with pytest.raises(CodegenError, match=name):
        lower_to_plan(module, PlanOptions(arch="sm_80", dtype="f32"), step=False)
