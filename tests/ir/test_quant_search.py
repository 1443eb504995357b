"""The symmetric scale search of ir/quant.py: never worse than max-abs, better on average, valid codes."""

import pytest
import torch

from llmc.compiler.ir.quant import code_range, dequantize, quantize_weight, unpack_codes


def max_abs_error(w, bits, group, importance=None):
    """Per-group (weighted) squared error of the plain max-abs scale e / -2^(b-1) (fp16, as stored)."""
    lo, hi = code_range(bits, True)
    g = w.reshape(w.shape[0], -1, group)
    e = g.gather(-1, g.abs().argmax(-1, keepdim=True))
    s = (e / lo).half().float()
    q = torch.round(g / torch.where(s == 0, torch.ones_like(s), s)).clamp(lo, hi)
    wt = 1 if importance is None else importance.reshape(1, -1, group)
    return (wt * (g - s * q) ** 2).sum(-1)


@pytest.mark.parametrize("bits,group,weighted", [(4, 32, False), (4, 32, True), (4, 128, False), (8, 32, False),
                                                 (8, 64, True)])
def test_search_never_worse_than_max_abs_and_better_on_average(bits, group, weighted):
    g = torch.Generator().manual_seed(bits * 1000 + group + weighted)
    n, k = 48, 256
    # mixed shapes of groups: gaussian, heavy-tailed, offset (as a Q4_1 grid), and all-zero rows
    w = torch.cat([torch.randn(16, k, generator=g),
                   torch.randn(16, k, generator=g) ** 3,
                   torch.rand(14, k, generator=g) - 0.2,
                   torch.zeros(2, k)])
    imp = torch.rand(k, generator=g) ** 4 * 10 if weighted else None
    codes, scales, mins = quantize_weight(w, bits=bits, group_size=group, symmetric=True, importance=imp)
    assert mins is None and scales.dtype == torch.float16 and scales.shape == (n, k // group)
    lo, hi = code_range(bits, True)
    q = unpack_codes(codes, bits, True)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    deq = dequantize(codes, scales, None, bits=bits, group_size=group, signed=True)
    # the round trip: the stored codes times the stored scales are what was measured
    torch.testing.assert_close(deq.reshape(n, -1, group),
                               scales.float().unsqueeze(-1) * q.reshape(n, -1, group).float())
    wt = 1 if imp is None else imp.reshape(1, -1, group)
    err = (wt * (w.reshape(n, -1, group) - deq.reshape(n, -1, group)) ** 2).sum(-1)
    base = max_abs_error(w, bits, group, imp)
    assert bool((err <= base * (1 + 1e-6) + 1e-12).all()), (err - base).max()
    assert err.sum() < 0.95 * base.sum(), (err.sum() / base.sum()).item()
    assert bool((deq[-2:] == 0).all())  # zero groups stay zero


def test_importance_moves_error_to_unimportant_channels():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g)
    imp = torch.ones(128)
    imp[::4] = 100.0  # every fourth input channel matters 100x
    plain = quantize_weight(w, bits=4, group_size=32, symmetric=True)
    weighted = quantize_weight(w, bits=4, group_size=32, symmetric=True, importance=imp)

    def err(qw):
        deq = dequantize(*qw, bits=4, group_size=32, signed=True)
        return ((w - deq) ** 2 * imp).sum()

    assert err(weighted) < 0.9 * err(plain)


def test_bad_importance_is_refused():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="one per input channel"):
        quantize_weight(w, bits=4, group_size=32, symmetric=True, importance=torch.ones(32))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_weight(w, bits=4, group_size=32, symmetric=True, importance=-torch.ones(64))
