"""Recognition of attention a model computes itself (frontend/self_attention.py): the
numeric identification of scale, sliding window and ALiBi slopes from example values, and
its refusals. The whole path (trace, rewrite, import, parity) runs in the registry sweep
(gpt_neo, bloom in test_arch_sweep's fast subset)."""

from types import SimpleNamespace as NS

import pytest
import torch

from llmc.compiler.frontend.self_attention import SelfAttentionError, identify

H, T, D = 4, 10, 8


def _site_and_values(bias=None, window=0, mask=None, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
    scores = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) if mask is None else mask
    if window:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    x = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = x.softmax(-1) @ v
    node = lambda name: NS(name=name)  # noqa: E731
    site = NS(q=node("q"), kt=node("kt"), v=node("v"), softmax=NS(name="softmax", args=[node("x")]), out=node("out"),
              heads=0, kv_heads=0, scale=0.0, window=0, alibi=None)
    return site, {"q": q, "kt": k.transpose(-1, -2), "v": v, "x": x, "out": out}


def test_scale_and_window_are_identified():
    site, values = _site_and_values(window=4, scale=0.3)
    identify(site, values, T, "M")
    assert site.heads == H and site.window == 4 and site.alibi is None
    assert abs(site.scale - 0.3) < 1e-5


def test_alibi_slopes_are_identified_up_to_a_row_constant():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    j = torch.arange(T)
    bias = slopes[None, :, None, None] * j[None, None, None, :] + 7.0  # Bloom's form: slope * key position
    site, values = _site_and_values(bias=bias)
    identify(site, values, T, "M")
    assert site.alibi is not None and torch.allclose(torch.tensor(site.alibi), slopes, atol=1e-5)


def test_a_bias_of_another_form_is_refused():
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(1, H, T, T, generator=g)  # e.g. learned relative-position buckets
    site, values = _site_and_values(bias=bias)
    with pytest.raises(SelfAttentionError, match="not a scaled q·k product plus an ALiBi bias"):
        identify(site, values, T, "M")


def test_a_mask_that_is_not_causal_is_refused():
    i = torch.arange(T)
    prefix_lm = (i[None, :] <= i[:, None]) | (i[None, :] < 3)  # bidirectional prefix
    site, values = _site_and_values(mask=prefix_lm)
    with pytest.raises(SelfAttentionError, match="neither causal nor a causal sliding window"):
        identify(site, values, T, "M")
