"""The cpu attention kernels against the IR's attention meaning (interpreter.attention_reference),
on random inputs, over a prefill, a second chunk that continues the sequence, and a decode step:
grouped/multi/multi-query heads, sliding windows shorter and longer than a key block, softcaps,
lengths that are not multiples of the tile or the key block."""

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx as tir

from llmc.compiler.codegen.tvm.attention import KEY_BLOCK, attention_te, fast_exp, prefill_attention
from llmc.compiler.codegen.tvm.lower import CTX_BLOCK
from llmc.compiler.codegen.tvm.schedule import schedule_primfunc
from llmc.compiler.ir.interpreter import KVCache, attention_reference
from llmc.runtime.cpu_features import host_mcpu

S = 4 * KEY_BLOCK
CHUNKS = (45, 37, 1)  # prefill, a continuation chunk, a decode step
CONFIGS = {  # hq, hkv, d, dv, window, softcap
    "gqa-smollm2": (9, 3, 64, 64, 0, 0.0),
    "mha-window6": (4, 4, 16, 16, 6, 0.0),
    "gqa4-window40-softcap": (8, 2, 32, 32, 40, 30.0),
    "mqa-dv8": (6, 1, 16, 8, 0, 0.0),
}


def _compile(func):
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": 2})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()["main"]


def _te_kernel(hq, hkv, d, dv, attrs):
    t, blocks = tir.Var("T", "int64"), tir.Var("ctx_blocks", "int64")
    q = te.placeholder((t, hq, d), name="q")
    kc, vc = te.placeholder((hkv, d, S), name="kc"), te.placeholder((S, hkv, dv), name="vc")
    pos = te.placeholder((t,), "int64", name="pos")
    out = attention_te(q, kc, vc, pos, blocks * CTX_BLOCK, attrs)
    return _compile(schedule_primfunc(te.create_prim_func([q, kc, vc, pos, out, blocks]), decode=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_kernels_match_reference(name):
    hq, hkv, d, dv, window, softcap = CONFIGS[name]
    attrs = {"scale": d ** -0.5, "window": window, "softcap": softcap}
    kernels = {"prefill": _compile(prefill_attention(hq, hkv, d, dv, S, attrs["scale"], window, softcap)),
               "te": _te_kernel(hq, hkv, d, dv, attrs)}
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    k_cache = {kind: np.zeros((hkv, d, S), np.float32) for kind in kernels}
    v_cache = {kind: np.zeros((S, hkv, dv), np.float32) for kind in kernels}
    ref_cache, start = KVCache(), 0
    for length in CHUNKS:
        q = torch.randn(length, hq, d, generator=g) * 2
        k = torch.randn(length, hkv, d, generator=g) * 2
        v = torch.randn(length, hkv, dv, generator=g)
        positions = torch.arange(start, start + length)
        want = attention_reference(q, k, v, positions, ref_cache, 0, attrs["scale"], window, softcap).numpy()
        for kind, kernel in kernels.items():
            k_cache[kind][:, :, start:start + length] = k.numpy().transpose(1, 2, 0)
            v_cache[kind][start:start + length] = v.numpy()
            out = tvm.runtime.empty((length, hq, dv), "float32")
            args = [tvm.runtime.tensor(a) for a in (q.numpy(), k_cache[kind], v_cache[kind], positions.numpy())]
            kernel(*args, out, *([-(-(start + length) // CTX_BLOCK)] if kind == "te" else []))
            err = np.abs(out.numpy() - want).max()
            assert err <= 1e-4, f"{kind} kernel, chunk of {length} at position {start}: max error {err:.2e}"
        start += length


def test_fast_exp_is_accurate_where_softmax_uses_it():
    x = np.concatenate([-np.geomspace(1e-8, 87, 4000), [0.0, -86.9]]).astype(np.float32)

    @tvm.script.tirx.prim_func(check_well_formed=False)
    def f(a: tvm.script.tirx.Buffer((4002,), "float32"), b: tvm.script.tirx.Buffer((4002,), "float32")):
        for i in tvm.script.tirx.vectorized(4002):
            b[i] = fast_exp(a[i])

    out = tvm.runtime.empty((4002,), "float32")
    _compile(f)(tvm.runtime.tensor(x), out)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out.numpy() - want) / want) < 2e-7
