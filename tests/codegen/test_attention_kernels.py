"""The cpu attention kernels against the IR's meanings (interpreter.kv_append_reference and
paged_attention_reference) on random inputs: several sequences in one batch with blocks
scattered over the pool, each continuing from its own history (a prefill, a continuation
chunk, a decode token), a padding row, grouped/multi/multi-query heads, sliding windows
shorter and longer than a block, softcaps, lengths that are not multiples of a tile or block;
each with float32 pools and with float16 pools (--kv-dtype float16: rounded on append, widened
to float32 on load), and with int8 pools (--kv-dtype int8: codes and a float32 scale per position
and head, the kernels' attention matching the reference over the pools' dequantized values)."""

import numpy as np
import pytest
import torch
import tvm

from llmc.compiler.codegen.tvm.attention import (SCALE_BYTES, fast_exp, from_int8_layouts, kv_append_kernel,
                                                 paged_attention_kernel, to_int8_layouts)
from llmc.compiler.ir.interpreter import kv_append_reference, paged_attention_reference
from llmc.runtime.cpu_features import host_mcpu

CONFIGS = {  # hq, hkv, d, dv, window, softcap, block size
    "gqa-smollm2": (9, 3, 64, 64, 0, 0.0, 32),
    "mha-window6": (4, 4, 16, 16, 6, 0.0, 16),
    "gqa4-window40-softcap": (8, 2, 32, 32, 40, 30.0, 16),
    "mqa-dv8": (6, 1, 16, 8, 0, 0.0, 32),
    "gqa-window6-sinks": (8, 2, 16, 16, 6, 0.0, 16),  # attention sinks (GPT-OSS style)
    "gqa-chunk12": (8, 2, 16, 16, 0, 0.0, 16),  # chunked attention (Llama 4), chunks not block-aligned
    "gqa-alibi": (8, 2, 16, 16, 0, 0.0, 16),  # ALiBi slopes (Bloom / MPT)
}
CHUNK = {"gqa-chunk12": 12}
ALIBI = {"gqa-alibi": [2.0 ** -(i + 1) for i in range(8)]}
HISTORY = (0, 37, 70, 5)   # tokens each sequence already cached
NEW = (45, 29, 1, 1)        # tokens each sequence adds in the batch
ROWS = 4


def _compile(func, mcpu=None):
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_mcpu(), "num-cores": 2})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()["main"]


def to_cpu_layouts(k_pool, v_pool):
    """IR pool layout [NB, BS, H, D] -> the cpu target's (keys transposed per block)."""
    return np.ascontiguousarray(k_pool.numpy().transpose(0, 2, 3, 1)), np.ascontiguousarray(v_pool.numpy())


def paged_batch(name: str, kv_dtype: str) -> dict:
    """A mixed batch over scattered blocks (see the module docstring), with its history pools."""
    hq, hkv, d, dv, window, softcap, bs = CONFIGS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name + kv_dtype)))
    nb = sum(-(-(h + n) // bs) for h, n in zip(HISTORY, NEW)) + 3
    k_pool, v_pool = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, dv, generator=g)
    free = torch.randperm(nb, generator=g).tolist()
    width = max(-(-(h + n) // bs) for h, n in zip(HISTORY, NEW))
    tables = torch.zeros(len(NEW), width, dtype=torch.int64)
    slots = []
    for b, (h, n) in enumerate(zip(HISTORY, NEW)):
        blocks = [free.pop() for _ in range(-(-(h + n) // bs))]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        pos = torch.arange(h, h + n)
        slots.append(torch.tensor(blocks)[pos // bs] * bs + pos % bs)
    t = sum(NEW) + 1  # one padding row at the end, owned by no sequence
    slot_mapping = torch.cat(slots + [torch.tensor([-1])])
    q = torch.randn(t, hq, d, generator=g) * 2
    k, v = torch.randn(t, hkv, d, generator=g) * 2, torch.randn(t, hkv, dv, generator=g)
    starts = torch.tensor(np.concatenate([[0], np.cumsum(NEW)]))
    lens = torch.tensor([h + n for h, n in zip(HISTORY, NEW)])
    sinks = torch.randn(hq, generator=g) * 3 if "sinks" in name else None
    return dict(k_pool=k_pool, v_pool=v_pool, tables=tables, slot_mapping=slot_mapping, q=q, k=k, v=v, starts=starts,
                lens=lens, t=t, sinks=sinks, args=(d ** -0.5, window, softcap), chunk=CHUNK.get(name, 0),
                alibi=ALIBI.get(name))


def run_kernels(name: str, kv_dtype: str, kp, vp, b: dict, mcpu=None) -> np.ndarray:
    """kv_append of the batch's keys and values into (kp, vp), then paged_attention's output."""
    hq, hkv, d, dv, window, softcap, bs = CONFIGS[name]
    slots = tvm.runtime.tensor(b["slot_mapping"].numpy())
    _compile(kv_append_kernel(hkv, d, bs, True, "float32", kv_dtype), mcpu)(tvm.runtime.tensor(b["k"].numpy()), slots, kp)
    _compile(kv_append_kernel(hkv, dv, bs, False, "float32", kv_dtype), mcpu)(tvm.runtime.tensor(b["v"].numpy()), slots, vp)
    kernel = _compile(paged_attention_kernel(hq, hkv, d, dv, bs, *b["args"], ROWS, threads=2,
                                             sinks=b["sinks"] is not None, chunk=b["chunk"], alibi=b["alibi"],
                                             kv_dtype=kv_dtype), mcpu)
    out = tvm.runtime.tensor(np.full((b["t"], hq, dv), np.nan, np.float32))
    extra = [] if b["sinks"] is None else [tvm.runtime.tensor(b["sinks"].numpy())]
    kernel(tvm.runtime.tensor(b["q"].numpy()), kp, vp,
           *(tvm.runtime.tensor(b[x].numpy()) for x in ("tables", "lens", "starts")), *extra, out)
    return out.numpy()


def exact_attention(b: dict) -> np.ndarray:
    """Attention over the unrounded history and step, in float64."""
    exact_k, exact_v = kv_append_reference(b["k_pool"].double(), b["v_pool"].double(), b["k"].double(),
                                           b["v"].double(), b["slot_mapping"])
    sinks = None if b["sinks"] is None else b["sinks"].double()
    return paged_attention_reference(b["q"].double(), exact_k, exact_v, b["tables"], b["lens"], b["starts"],
                                     *b["args"], sinks, b["chunk"], b["alibi"]).numpy()


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paged_kernels_match_reference(name, kv_dtype):
    b = paged_batch(name, kv_dtype)
    stored = getattr(torch, kv_dtype)
    k_pool, v_pool = b["k_pool"].to(stored).float(), b["v_pool"].to(stored).float()  # the history, as a pool holds it
    k, v, slot_mapping = b["k"], b["v"], b["slot_mapping"]
    # the pools after the append hold this step's keys and values rounded to the pool dtype (nearest)
    want_k, want_v = kv_append_reference(k_pool, v_pool, k.to(stored).float(), v.to(stored).float(), slot_mapping)
    want = paged_attention_reference(b["q"], want_k, want_v, b["tables"], b["lens"], b["starts"], *b["args"],
                                     b["sinks"], b["chunk"], b["alibi"]).numpy()

    kp, vp = (tvm.runtime.tensor(a.astype(kv_dtype)) for a in to_cpu_layouts(k_pool, v_pool))
    out = run_kernels(name, kv_dtype, kp, vp, b)
    got_k, got_v = to_cpu_layouts(want_k, want_v)
    assert kp.numpy().dtype == kv_dtype
    assert np.array_equal(kp.numpy().astype(np.float32), got_k) and np.array_equal(vp.numpy().astype(np.float32), got_v)
    err = np.abs(out - want).max()
    assert err <= 1e-4, f"max error {err:.2e}"  # float32 arithmetic over the stored keys and values
    if kv_dtype == "float16":  # and within float16 storage of attention over the unrounded step (float64)
        assert np.abs(out - exact_attention(b)).max() <= 1e-2


@pytest.mark.parametrize("name,mcpu", [(n, None) for n in sorted(CONFIGS)] + [("gqa-smollm2", "x86-64-v3")])
def test_int8_pools_match_reference(name, mcpu):
    """int8 pools: the append stores every new vector within half a step (max|x| / 254) of its
    values and leaves the rest of the pool alone; attention matches the reference over what the
    pools then hold, and stays within int8 storage of the exact (float64, unrounded) result."""
    import platform

    if mcpu and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86-64-v3 (AVX2) build runs on x86-64 hosts only")
    hq, hkv, d, dv, window, softcap, bs = CONFIGS[name]
    b = paged_batch(name, "int8")
    if d % SCALE_BYTES or dv % SCALE_BYTES:
        with pytest.raises(ValueError, match="multiples of 4"):
            paged_attention_kernel(hq, hkv, d, dv, bs, *b["args"], ROWS, threads=2, kv_dtype="int8")
        return
    kp0, vp0 = to_int8_layouts(b["k_pool"].numpy(), b["v_pool"].numpy())
    kp, vp = tvm.runtime.tensor(kp0), tvm.runtime.tensor(vp0)
    out = run_kernels(name, "int8", kp, vp, b, mcpu)
    held_k, held_v = (torch.from_numpy(a) for a in from_int8_layouts(kp.numpy(), vp.numpy()))
    written = b["slot_mapping"] >= 0
    slots = b["slot_mapping"][written]
    for new, held in ((b["k"][written], held_k), (b["v"][written], held_v)):
        got = held.reshape(-1, *held.shape[2:])[slots]
        step = new.abs().amax(-1, keepdim=True) / 254
        assert ((got - new).abs() <= step * 1.001 + 1e-7).all()
    before_k, before_v = (torch.from_numpy(a) for a in from_int8_layouts(kp0, vp0))
    untouched = torch.ones(held_k.shape[0] * bs, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(held_k.reshape(-1, *held_k.shape[2:])[untouched], before_k.reshape(-1, *held_k.shape[2:])[untouched])
    assert torch.equal(held_v.reshape(-1, *held_v.shape[2:])[untouched], before_v.reshape(-1, *held_v.shape[2:])[untouched])
    want = paged_attention_reference(b["q"], held_k, held_v, b["tables"], b["lens"], b["starts"], *b["args"],
                                     b["sinks"], b["chunk"], b["alibi"]).numpy()
    assert np.abs(out - want).max() <= 1e-4
    # outputs ~1 from logits with a standard deviation of ~4 here: measured 0.04-0.085 off (float16: < 1e-2)
    assert np.abs(out - exact_attention(b)).max() <= 0.2


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


def test_float16_pools_widen_in_vectors():
    """The x86-64-v3 build (F16C) converts whole key / value vectors (vcvtph2ps) and never calls
    the scalar float16 helpers; the append narrows with vcvtps2ph. (Only code generation: no
    F16C needed on the host.)"""
    import re

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
    funcs = {"attention": paged_attention_kernel(9, 3, 64, 64, 32, 0.125, 0, 0.0, 1, 2, lanes=8, registers=16,
                                                 kv_dtype="float16"),
             "append": kv_append_kernel(3, 64, 32, False, "float32", "float16")}
    for name, func in funcs.items():
        asm = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod.inspect_source("asm")
        assert not re.search(r"call\w*\s+_*(extendhfsf2|truncsfhf2|gnu_h2f|gnu_f2h)", asm), name
        convert = "vcvtph2ps" if name == "attention" else "vcvtps2ph"
        assert re.search(convert + r"\s+[^\n]*%ymm", asm), name  # 8 lanes at once


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_next_block_prefetch_reaches_the_machine_code(kv_dtype):
    """The kernel asks for the next key block while it works on one (a decode batch's pool is
    cold: 16-33% less time measured); without ``prefetch`` no prefetch is emitted. The
    results are checked with it on by test_paged_kernels_match_reference."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checks x86 prefetch instructions")
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": 2})
    asm = {}
    for on in (True, False):
        func = paged_attention_kernel(9, 3, 64, 64, 32, 0.125, 0, 0.0, 1, 2, kv_dtype=kv_dtype, prefetch=on)
        built = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        asm[on] = built.mod.inspect_source("asm")
    assert asm[True].count("prefetcht1") >= 2 and "prefetch" not in asm[False]
