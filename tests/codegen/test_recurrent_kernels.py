"""The cpu kernels of the recurrent-state step ops against the IR's meanings
(ir/recurrent.step_reference) on random inputs: a batch of sequences in scattered slots, some
starting fresh over a slot full of garbage, some continuing from their state (a prefill, a
continuation chunk, decode tokens), channel counts that do and do not fill a vector, scalar and
per-channel gates."""

import numpy as np
import pytest
import torch
import tvm

from llmc.compiler.codegen.tvm.recurrent import conv_step_kernel, delta_rule_step_kernel
from llmc.compiler.ir.recurrent import step_reference
from tests.codegen.test_attention_kernels import _compile

NEW = (9, 1, 4, 1)          # tokens each sequence brings
FRESH = (True, False, False, True)
SLOTS = (3, 0, 5, 1)
SLOT_COUNT = 6


def _batch():
    starts = torch.tensor([0] + list(np.cumsum(NEW)), dtype=torch.int64)
    lens = torch.tensor([n if f else n + 7 for n, f in zip(NEW, FRESH)], dtype=torch.int64)
    return torch.tensor(SLOTS, dtype=torch.int64), lens, starts, int(starts[-1])


def _t(x):
    return tvm.runtime.tensor(np.ascontiguousarray(x.numpy()))


@pytest.mark.parametrize("channels,width,bias", [(32, 4, True), (20, 3, False)])
def test_conv_step_kernel_matches_reference(channels, width, bias):
    g = torch.Generator().manual_seed(channels)
    slots, lens, starts, t = _batch()
    x, w = torch.randn(t, channels, generator=g), torch.randn(channels, width, generator=g)
    b = torch.randn(channels, generator=g) if bias else None
    pool = torch.randn(SLOT_COUNT, width - 1, channels, generator=g)
    want, want_pool = step_reference("causal_conv1d_step", pool, [x, w] + ([b] if bias else []), slots, lens, starts)
    fn = _compile(conv_step_kernel(channels, width, bias))
    tp, out = _t(pool), tvm.runtime.tensor(np.full((t, channels), np.nan, dtype=np.float32))
    fn(*[_t(a) for a in [x, w, slots, lens, starts] + ([b] if bias else [])], tp, out)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(tp.numpy(), want_pool.numpy(), atol=1e-6)


@pytest.mark.parametrize("per_channel,delta", [(False, True), (True, True), (True, False)])
def test_delta_rule_step_kernel_matches_reference(per_channel, delta):
    heads, dk, dv = 3, 8, 12
    g = torch.Generator().manual_seed(int(per_channel))
    slots, lens, starts, t = _batch()
    q, k, v = torch.randn(t, heads, dk, generator=g), torch.randn(t, heads, dk, generator=g) * 0.3, \
        torch.randn(t, heads, dv, generator=g)
    gate = -torch.rand((t, heads, dk) if per_channel else (t, heads), generator=g)
    beta = torch.rand(t, heads, generator=g)
    pool = torch.randn(SLOT_COUNT, heads, dk, dv, generator=g)
    want, want_pool = step_reference("gated_delta_rule_step", pool, [q, k, v, gate, beta], slots, lens, starts,
                                     delta=delta)
    fn = _compile(delta_rule_step_kernel(heads, dk, dv, per_channel, delta))
    tp, out = _t(pool), tvm.runtime.tensor(np.full((t, heads, dv), np.nan, dtype=np.float32))
    fn(*[_t(a) for a in (q, k, v, gate, beta, slots, lens, starts)], tp, out)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-4)
    np.testing.assert_allclose(tp.numpy(), want_pool.numpy(), atol=1e-4)
