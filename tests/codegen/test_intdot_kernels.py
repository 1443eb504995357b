"""The integer-dot-product quantized linear (compiler/codegen/tvm/intdot.py) on fresh random
inputs, for every x86 ISA variant it has (AVX-512 VNNI, AVX-512BW, AVX2 = x86-64-v3; the
AArch64 ones are compiled here and run under qemu in test_aarch64_qemu.py): the int8
activation blocks equal a numpy quantization, the kernel equals the exact integer scheme
(dequantized weights times dequantized activations) to float rounding, and the float
reference within the activation-quantization error."""

import numpy as np
import pytest
import torch
import tvm

from llmc.compiler.codegen.llvm_cpu import resolve_cpu
from llmc.compiler.codegen.tvm import intdot
from llmc.compiler.ir.quant import code_range, dequantize, pack_codes
from llmc.runtime.cpu_features import host_mcpu
from tests.codegen.helpers import extreme_codes_and_activations

HOST_FLAGS = set(open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split())
ISAS = {"avx512vnni": ("znver4", intdot.IntDotIsa("avx512vnni", 16, 32)),
        "avx512bw": ("skylake-avx512", intdot.IntDotIsa("avx512bw", 16, 32)),
        # ymm vpdpbusd: the VEX form (AVX-VNNI) where the host has it, else the EVEX form of
        # AVX-512 VNNI + VL, the same instruction on the same registers
        "avxvnni": ("alderlake" if "avx_vnni" in HOST_FLAGS else "znver4", intdot.IntDotIsa("avxvnni", 8, 16)),
        "avx2": ("x86-64-v3", intdot.IntDotIsa("avx2", 8, 16))}
NEEDS = {"avx512vnni": {"avx512_vnni", "avx512bw"}, "avx512bw": {"avx512bw"}, "avx2": {"avx2"},
         "avxvnni": {"avx_vnni"} if "avx_vnni" in HOST_FLAGS else {"avx512_vnni", "avx512vl"}}


def _case(isa, *rest, slow=False):
    marks = [pytest.mark.skipif(not NEEDS[isa] <= HOST_FLAGS, reason=f"host lacks {isa}")]
    return pytest.param(isa, *rest, marks=marks + ([pytest.mark.slow] if slow else []))


def _compile(func, mcpu):
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()["main"]


def run(isa_name, m, n, k, group, signed, mins, decode, seed=0):
    mcpu, isa = ISAS[isa_name]
    g = torch.Generator().manual_seed(seed)
    lo, hi = code_range(4, signed)
    codes = pack_codes(torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int32), 4, signed)
    scales = (torch.rand(n, k // group, generator=g) * 0.02).half()
    mn = (torch.randn(n, k // group, generator=g) * 0.05).half() if mins else None
    x = torch.randn(m, k, generator=g)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    qf = _compile(intdot.quantize_rows_kernel(k), mcpu)
    ilv = intdot.weight_interleave(isa, n, 4)  # the stored layout, shared by the decode and prefill kernels
    lf = _compile(intdot.intdot_linear_kernel(isa, n, k, group, signed, mins, "float16", decode, ilv=ilv), mcpu)
    q = tvm.runtime.tensor(np.zeros((m, k // 4), np.int32))
    d = tvm.runtime.tensor(np.zeros((m, k // 32), np.float32))
    ds = tvm.runtime.tensor(np.zeros((m, k // 32), np.float32))
    qf(tvm.runtime.tensor(x.numpy()), q, d, ds)
    xb = x.numpy().reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    qq = np.round(xb * np.where(amax > 0, 127 / np.maximum(amax, 1e-30), 0)).astype(np.int32)
    assert np.array_equal(q.numpy().view(np.int8).reshape(m, k // 32, 32), qq.astype(np.int8))
    np.testing.assert_allclose(d.numpy(), amax[..., 0] / 127, rtol=1e-6)
    L = isa.lanes
    s = tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_groups(scales.numpy(), L), ilv))
    args = [q, d, ds, tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_codes(codes.numpy(), L), ilv)), s,
            tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_groups(mn.numpy(), L), ilv)) if mins else s]
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lf(*args, y)
    w = dequantize(codes, scales, mn, bits=4, group_size=group, signed=signed).numpy()
    exact = (qq * (amax / 127)).reshape(m, k) @ w.T
    floats = x.numpy() @ w.T
    return y.numpy(), exact, floats


CASES = [(isa, (32, False, True)) for isa in ISAS] + [("avx2", (128, True, False)), ("avx2", (256, True, False))]
SLOW = [(isa, layout) for isa in ISAS for layout in [(32, True, False), (64, False, True), (128, True, False)]
        if (isa, layout) not in CASES]


@pytest.mark.parametrize("isa,layout", [_case(i, lay) for i, lay in CASES] + [_case(i, lay, slow=True) for i, lay in SLOW])
def test_gemv_and_gemm_equal_the_integer_scheme(isa, layout):
    group, signed, mins = layout
    # n = 512: the widest decode tile (8 blocks on AVX-512, 4 on AVX2) and its interleaved
    # layout, read by the prefill tiles too (m = 13, 5); n = 64: the narrowest, not interleaved
    # m = 8: one 8-row VNNI tile, the prefetching body (``batch_prefetch``) over the interleaved codes;
    # m = 2, 3: the one-row decode tile row after row (``FEW_ROWS``); m = 4: the 4-row tile on VNNI
    for m, n, decode in ((1, 512, True), (1, 64, True), (13, 64, False), (13, 512, False), (5, 512, False),
                         (8, 512, False), (2, 512, False), (3, 64, False), (4, 512, False)):
        got, exact, floats = run(isa, m, n, 256, group, signed, mins, decode, seed=group + m + n)
        scale = 1 + np.abs(exact).max()
        assert np.abs(got - exact).max() <= 1e-5 * scale
        # activation quantization: |x - q d| <= d / 2 per element, relative ~ 1/254 of a block's max
        assert np.abs(got - floats).max() <= 2e-2 * scale


def test_repack_codes_round_trips_through_code_at():
    """The layout's documented meaning (code_at) reads back every code."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    packed = intdot.repack_codes(pack_codes(raw, 4, False).numpy(), 16).view(np.uint8).reshape(2, 2, 256)
    for n, k in [(0, 0), (5, 1), (17, 16), (31, 63), (9, 35), (16, 47)]:
        g_, r = k // 32, k % 32
        byte = packed[n // 16, g_, (r % 16) // 4 * 64 + (n % 16) * 4 + r % 4]
        assert (byte >> (4 * (r // 16))) & 15 == raw[n, k]


@pytest.mark.parametrize("bits,signed,ilv", [(5, True, 1), (6, False, 2), (6, True, 1), (4, False, 2), (8, True, 1)])
def test_code_at_reads_every_layout(bits, signed, ilv):
    """code_at (the embedding gather of a table the LM head shares) evaluated by TVM on the
    stored layout of every code width, interleaved or not, returns the unsigned stored code."""
    L, n, k = 8, 32, 64
    rng = np.random.default_rng(bits + 10 * ilv)
    lo, hi = code_range(bits, signed)
    raw = rng.integers(lo, hi + 1, (n, k)).astype(np.int32)
    stored = intdot.interleave_blocks(intdot.repack_any(pack_codes(torch.from_numpy(raw), bits, signed).numpy(), L,
                                                        bits, signed), ilv)
    sb = intdot.storage_bits(bits)
    codes = tvm.tirx.decl_buffer(stored.shape, "int32", "codes")
    out = tvm.tirx.decl_buffer((n, k), "int32", "out")
    i, j = tvm.tirx.Var("i", "int64"), tvm.tirx.Var("j", "int64")
    body = tvm.tirx.BufferStore(out, intdot.code_at(codes, i, j, L, sb, ilv), [i, j])
    loop = tvm.tirx.For(i, 0, n, tvm.tirx.ForKind.SERIAL, tvm.tirx.For(j, 0, k, tvm.tirx.ForKind.SERIAL, body))
    func = tvm.tirx.PrimFunc([codes, out], loop).with_attr("global_symbol", "main")
    f = tvm.compile(tvm.IRModule({"main": func}), target="llvm").jit()["main"]
    got = tvm.runtime.tensor(np.zeros((n, k), np.int32))
    f(tvm.runtime.tensor(stored), got)
    offset = intdot.code_offset(bits if sb != 8 else 8, signed)
    assert np.array_equal(got.numpy(), raw + offset)


def test_isa_chosen_from_the_target_features():
    assert intdot.int_dot_isa("x86_64", resolve_cpu("znver4").required_flags).name == "avx512vnni"
    assert intdot.int_dot_isa("x86_64", resolve_cpu("skylake-avx512").required_flags).name == "avx512bw"
    assert intdot.int_dot_isa("x86_64", resolve_cpu("x86-64-v3").required_flags).name == "avx2"
    assert intdot.int_dot_isa("x86_64", resolve_cpu("x86-64").required_flags) is None  # SSE only: float path
    # AArch64: dotprod (sdot) from Armv8.2 cores on, i8mm's usdot where present; NEON alone: float path
    assert intdot.int_dot_isa("aarch64", ["asimd", "asimddp"]) == intdot.IntDotIsa("neondot", 4, 32)
    assert intdot.int_dot_isa("aarch64", resolve_cpu("neoverse-n1").required_flags).name == "neondot"
    assert intdot.int_dot_isa("aarch64", resolve_cpu("neoverse-n2").required_flags).name == "neoni8mm"
    assert intdot.int_dot_isa("aarch64", resolve_cpu("cortex-a72").required_flags) is None
    assert intdot.int_dot_isa("aarch64", resolve_cpu("aarch64").required_flags) is None
    host = intdot.int_dot_isa("x86_64", resolve_cpu(host_mcpu()).required_flags)
    assert host is None or host.name in ISAS
    # a host build adds the VNNI the x86-64 levels leave out (x86-64-v4 has none)
    built = resolve_cpu(None)
    if {"avx512_vnni", "avx512f"} <= HOST_FLAGS:
        assert "+avx512vnni" in built.mattr and intdot.int_dot_isa(built.arch, built.required_flags).name == "avx512vnni"


def test_register_tiles_fit_the_register_file():
    """AVX2's 16 registers get a smaller prefill tile than AVX-512's 32; VNNI takes the measured
    tiles (8 x 1 blocks, a 4 x 1 tile at 4 rows); decode widens instead."""
    wide, bw, narrow = ISAS["avx512vnni"][1], ISAS["avx512bw"][1], ISAS["avx2"][1]
    rb, cb = intdot.tiles(bw, 3072, decode=False)
    r2, c2 = intdot.tiles(narrow, 3072, decode=False)
    assert 2 * rb * cb + 2 * cb <= 24 and 2 * r2 * c2 + 2 * c2 <= 12 and rb * cb > r2 * c2
    assert intdot.tiles(wide, 3072, decode=False) == (8, 1) and intdot.small_tiles(8) == (4, 1)
    assert intdot.tiles(wide, 3072, decode=False, bits=8) == (8, 1)
    assert intdot.tiles(wide, 16 * 129, decode=False) == (8, 1) and intdot.small_tiles(4) is None
    assert intdot.tiles(wide, 3072, decode=True)[0] == 1
    # decode: as wide as the registers hold (two accumulators a block + 6 shared), >= 4 items
    assert intdot.tiles(wide, 1536, decode=True) == (1, 8) and intdot.tiles(narrow, 1536, decode=True) == (1, 4)
    for spec in (wide, narrow):
        for n in (192, 576, 1536, 49152):
            _, c = intdot.tiles(spec, n, decode=True)
            assert 2 * c + 6 <= spec.registers and (n // spec.lanes) % c == 0 and n // spec.lanes // c >= 4


@pytest.mark.skipif(not NEEDS["avx512vnni"] <= HOST_FLAGS, reason="host lacks avx512vnni")
@pytest.mark.parametrize("bits,m", [(4, 8), (4, 6), (4, 13), (8, 8), (8, 3), (4, 2), (4, 4), (8, 5)])
def test_vnni_tiles_on_batch_rows(bits, m):
    """The VNNI batch tiles (8 x 1 blocks; 4 x 1 at 4 rows; the one-row decode tile row after
    row at 2-3 rows) at batched-decode row counts, including a partial last row tile and clamped
    rows of the 8-row tile (5, 6 rows), equal the exact integer scheme."""
    mcpu, spec = ISAS["avx512vnni"]
    n, k = 16 * 24, 384  # 12 32-blocks: the prefetch of 8 ahead runs past the end (clamped)
    assert intdot.tiles(spec, n, False, bits) == (8, 1)
    g = torch.Generator().manual_seed(17 + m + bits)
    lo, hi = code_range(bits, bits == 8)
    codes = pack_codes(torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int32), bits, bits == 8)
    scales = (torch.rand(n, k // 32, generator=g) * 0.02).half()
    mn = (torch.randn(n, k // 32, generator=g) * 0.05).half() if bits == 4 else None
    x = torch.randn(m, k, generator=g)
    qf = _compile(intdot.quantize_rows_kernel(k), mcpu)
    lf = _compile(intdot.intdot_linear_kernel(spec, n, k, 32, bits == 8, bits == 4, "float16", False, bits=bits), mcpu)
    bufs = [tvm.runtime.tensor(np.zeros(s, dt)) for s, dt in (((m, k // 4), np.int32), ((m, k // 32), np.float32),
                                                               ((m, k // 32), np.float32))]
    qf(tvm.runtime.tensor(x.numpy()), *bufs)
    s = tvm.runtime.tensor(intdot.repack_groups(scales.numpy(), 16))
    mins = tvm.runtime.tensor(intdot.repack_groups(mn.numpy(), 16)) if bits == 4 else s
    packed = intdot.repack_codes(codes.numpy(), 16) if bits == 4 else intdot.repack_codes8(codes.numpy(), 16, True)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lf(*bufs, tvm.runtime.tensor(packed), s, mins, y)
    xb = x.numpy().reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    qx = np.round(xb * np.where(amax > 0, 127 / np.maximum(amax, 1e-30), 0)) * (amax / 127)
    w = dequantize(codes, scales, mn, bits=bits, group_size=32, signed=bits == 8).numpy()
    exact = qx.reshape(m, k) @ w.T
    assert np.abs(y.numpy() - exact).max() <= 1e-5 * (1 + np.abs(exact).max())


def test_decode_batch_tiles_prefetch_on_vnni_only():
    """A decode batch's tiles (at most one tile of rows: every weight from DRAM) prefetch the
    32-blocks ahead on VNNI, in the 8-row and the smaller tile, never in the tall body (prefill)
    nor the one-row GEMV; AVX2 measured slower with it and has none. Results with the prefetch
    on: test_gemv_and_gemm_equal_the_integer_scheme (m = 5, 8) and test_vnni_tiles_on_batch_rows."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("checks x86 prefetch instructions")

    def asm(isa_name, decode, prefetch=None):
        mcpu, spec = ISAS[isa_name]
        func = intdot.intdot_linear_kernel(spec, 512, 1024, 32, False, True, "float16", decode,
                                           ilv=intdot.weight_interleave(spec, 512, 4), prefetch=prefetch)
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
                           ).mod.inspect_source("asm")

    assert intdot.batch_prefetch(ISAS["avx512vnni"][1]) > 0 and intdot.batch_prefetch(ISAS["avx2"][1]) == 0
    # 8-row and 4-row tiles: codes (4 lines), scales and mins each; the tall body and the GEMV: none
    assert asm("avx512vnni", False).count("prefetcht1") == 2 * 6
    assert "prefetch" not in asm("avx512vnni", False, prefetch=0)
    assert "prefetch" not in asm("avx512vnni", True)
    assert "prefetch" not in asm("avx2", False)


@pytest.mark.parametrize("isa", [_case("avx512vnni"), _case("avx2")])
def test_gated_mlp_epilogue(isa):
    """glu=True writes silu(x · w) * up (SwiGLU's gate and product in the write-back)."""
    mcpu, spec = ISAS[isa]
    m, n, k = 5, 64, 128
    g = torch.Generator().manual_seed(11)
    codes = pack_codes(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32), 4, False)
    scales = (torch.rand(n, k // 32, generator=g) * 0.05).half()
    mn = (torch.randn(n, k // 32, generator=g) * 0.2).half()
    x = torch.randn(m, k, generator=g)
    up = torch.randn(m, n, generator=g)
    qf = _compile(intdot.quantize_rows_kernel(k), mcpu)
    lf = _compile(intdot.intdot_linear_kernel(spec, n, k, 32, False, True, "float16", False, glu=True), mcpu)
    bufs = [tvm.runtime.tensor(np.zeros(s, dt)) for s, dt in (((m, k // 4), np.int32), ((m, k // 32), np.float32),
                                                               ((m, k // 32), np.float32))]
    qf(tvm.runtime.tensor(x.numpy()), *bufs)
    L = spec.lanes
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lf(*bufs, tvm.runtime.tensor(intdot.repack_codes(codes.numpy(), L)),
       tvm.runtime.tensor(intdot.repack_groups(scales.numpy(), L)), tvm.runtime.tensor(intdot.repack_groups(mn.numpy(), L)),
       tvm.runtime.tensor(up.numpy()), y)
    gate = x @ dequantize(codes, scales, mn, bits=4, group_size=32, signed=False).T
    want = (torch.nn.functional.silu(gate) * up).numpy()
    assert np.abs(y.numpy() - want).max() <= 2e-2 * (1 + np.abs(want).max())


@pytest.mark.parametrize("isa,signed,bits", [_case(i, sg, 8) for i in ("avx512vnni", "avxvnni", "avx2") for sg in (True, False)]
                         + [_case(i, sg, b) for i in ("avx512vnni", "avx2") for sg, b in ((True, 5), (False, 5), (True, 6))])
def test_8bit_codes(isa, signed, bits):
    """Q8_0-style 8-bit codes (the LM head of a 4-bit file), stored +128 if signed: vpdpbusd on
    VNNI, the psignb/pmaddubsw/pmaddwd sign trick on AVX2; GEMM and GEMV tiles. 5- and 6-bit codes
    (Q5_0, Q5_1/Q5_K, Q6_K), stored one per byte, run on the same kernels (``storage_bits``)."""
    mcpu, spec = ISAS[isa]
    n, k, L = 64, 128, spec.lanes
    sb = intdot.storage_bits(bits)
    assert sb == {5: 5, 6: 6, 8: 8}[bits] and intdot.eligible(bits, 32, n, k, spec)
    g = torch.Generator().manual_seed(13 + signed + bits)
    lo, hi = code_range(bits, signed)
    codes = pack_codes(torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int32), bits, signed)
    scales = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    mn = None if signed else (torch.randn(n, k // 32, generator=g) * 0.5).half()
    s = tvm.runtime.tensor(intdot.repack_groups(scales.numpy(), L))
    mins = s if signed else tvm.runtime.tensor(intdot.repack_groups(mn.numpy(), L))
    w = tvm.runtime.tensor(intdot.repack_any(codes.numpy(), L, bits, signed))
    qf = _compile(intdot.quantize_rows_kernel(k), mcpu)
    for m, decode in ((3, False), (1, True)):
        x = torch.randn(m, k, generator=g)
        lf = _compile(intdot.intdot_linear_kernel(spec, n, k, 32, signed, not signed, "float16", decode, bits=sb), mcpu)
        bufs = [tvm.runtime.tensor(np.zeros(sh, dt)) for sh, dt in (((m, k // 4), np.int32), ((m, k // 32), np.float32),
                                                                    ((m, k // 32), np.float32))]
        qf(tvm.runtime.tensor(x.numpy()), *bufs)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lf(*bufs, w, s, mins, y)
        want = (x @ dequantize(codes, scales, mn, bits=bits, group_size=32, signed=signed).T).numpy()
        assert np.abs(y.numpy() - want).max() <= 2e-2 * (1 + np.abs(want).max())


SATURATION = [("avx2", 4, False), ("avx2", 4, True), ("avx2", 8, True), ("avx2", 8, False),
              ("avx512bw", 4, False), ("avx512vnni", 8, True), ("avx2", 5, True), ("avx2", 6, False),
              ("avx512bw", 6, True), ("avx512vnni", 6, False)]
SATURATION_SLOW = [("avx512bw", 4, True), ("avx512vnni", 4, False), ("avx512vnni", 8, False),
                   ("avxvnni", 4, False), ("avxvnni", 8, True), ("avxvnni", 8, False)]


@pytest.mark.parametrize("isa,bits,signed", [_case(*c) for c in SATURATION] + [_case(*c, slow=True) for c in SATURATION_SLOW])
def test_extreme_codes_and_activations_sum_exactly(isa, bits, signed):
    """The int16 bounds of the pmaddubsw paths: codes at both ends of their range (4-bit 15 and 0,
    or -8 and 7; 5/6-bit 31/63 and 0 (bit planes); 8-bit 255 and 0, or -128 and 127) against activations of +-127 in every lane
    (the quantize kernel's range: |round(x * 127 / max|x|)| <= 127). With unit scales every
    product and sum is an integer float32 holds exactly, so a saturated or wrapped int16 shows
    as an error of thousands; the result must be exact."""
    mcpu, spec = ISAS[isa]
    n, k, L = 32, 128, spec.lanes
    raw, q = extreme_codes_and_activations(bits, signed, n, k, bits * 2 + signed)
    raw = raw.numpy()
    m = q.shape[0]
    codes = pack_codes(torch.from_numpy(raw), bits, signed).numpy()
    ones = np.ones((n, k // 32), np.float16)
    mins = np.full((n, k // 32), 0.5, np.float16)  # exercises the min term exactly (half-integers)
    w = intdot.repack_any(codes, L, bits, signed)
    qsum = q.astype(np.float32).reshape(m, k // 32, 32).sum(-1)
    args = [tvm.runtime.tensor(np.ascontiguousarray(q).view(np.int32)), tvm.runtime.tensor(np.ones((m, k // 32), np.float32)),
            tvm.runtime.tensor(qsum), tvm.runtime.tensor(w), tvm.runtime.tensor(intdot.repack_groups(ones, L)),
            tvm.runtime.tensor(intdot.repack_groups(mins, L))]
    want = q.astype(np.int64) @ raw.T.astype(np.int64) + (0 if signed else 0.5 * qsum.sum(-1, keepdims=True))
    for rows, decode in ((m, False), (1, True)):
        lf = _compile(intdot.intdot_linear_kernel(spec, n, k, 32, signed, not signed, "float16", decode, bits=bits), mcpu)
        y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
        lf(*args, y)
        assert np.array_equal(y.numpy()[:rows], want[:rows].astype(np.float32)), (rows, np.abs(y.numpy()[:rows] - want[:rows]).max())


def test_avx_vnni_emits_ymm_vpdpbusd():
    """An AVX-VNNI CPU (Alder Lake and later; no AVX-512) gets the VEX vpdpbusd on ymm registers."""
    isa = intdot.int_dot_isa("x86_64", resolve_cpu("alderlake").required_flags)
    assert isa is not None and isa.name == "avxvnni" and isa.lanes == 8
    f = intdot.intdot_linear_kernel(isa, 64, 128, 32, False, True, "float16", False)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})
    asm = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "%ymm" in asm and "%zmm" not in asm and "vpmaddubsw" not in asm


@pytest.mark.parametrize("mcpu,bits,signed", [("neoverse-n1", 4, False), ("neoverse-n1", 8, True),
                                               ("neoverse-n2", 4, True), ("neoverse-n2", 8, False)])
def test_neon_kernels_emit_sdot(mcpu, bits, signed):
    """AArch64 builds (cross-compiled; run under qemu in test_aarch64_qemu.py): the dot steps are
    ``sdot`` on dotprod CPUs (8-bit codes flipped to s8 by one ``eor``), ``usdot`` with i8mm, on
    128-bit vectors of 4 int32 lanes, with no widening multiplies of the float path."""
    cpu = resolve_cpu(mcpu)
    isa = intdot.int_dot_isa(cpu.arch, cpu.required_flags)
    assert intdot.eligible(bits, 32, 64, 128, isa)
    asm = ""
    for decode in (True, False):
        f = intdot.intdot_linear_kernel(isa, 64, 128, 32, signed, not signed, "float16", decode, bits=bits,
                                        ilv=intdot.weight_interleave(isa, 64, bits))
        asm += tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                           target=cpu.tvm_target(2)).mod.inspect_source("asm")
    dots = [line.split() for line in asm.splitlines() if "sdot\t" in line]
    # per (row, block, 32-block): 8 dot steps (4 code vectors x 2 nibbles, or 8 byte vectors)
    assert len(dots) >= 8 * 2 and {d[0] for d in dots} == ({"usdot"} if isa.vnni else {"sdot"})
    assert all(d[1].endswith(".4s,") and d[2].endswith(".16b,") for d in dots)  # int32x4 += 16 bytes
    assert "smull" not in asm and "sxtl" not in asm  # no int8 -> int16 widening: the dot does it
    if bits == 8 and not isa.vnni:
        assert "eor\t" in asm  # u ^ 0x80 = u - 128 as s8 (the sign trick's offset)


def test_neon_tiles():
    """NEON: 32 registers of 4 lanes take VNNI's tile rules (int32 dots, float accumulators)."""
    isa = intdot.IntDotIsa("neondot", 4, 32)
    assert intdot.tiles(isa, 3072, decode=False) == (8, 1) and intdot.small_tiles(8) == (4, 1)
    assert intdot.tiles(isa, 3072, decode=False, bits=8) == (8, 1)
    for n in (64, 192, 576, 1536, 49152):
        _, c = intdot.tiles(isa, n, decode=True)
        assert 2 * c + 6 <= isa.registers and (n // 4) % c == 0 and n // 4 // c >= 4
    assert intdot.tiles(isa, 1536, decode=True) == (1, 8) and intdot.weight_interleave(isa, 1536, 4) == 8


@pytest.mark.parametrize("bits,signed,ilv", [(4, False, 1), (4, True, 1), (8, True, 1), (4, False, 2)])
def test_code_at_reads_the_repacked_layout(bits, signed, ilv):
    """The embedding gather of a table tied to an integer-kernel LM head reads every code back."""
    from tvm import te

    n, k, lanes = 32, 64, 16
    lo, hi = code_range(bits, signed)
    raw = torch.randint(lo, hi + 1, (n, k), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    stored = pack_codes(raw, bits, signed).numpy()
    packed = intdot.repack_codes(stored, lanes) if bits == 4 else intdot.repack_codes8(stored, lanes, signed)
    packed = intdot.interleave_blocks(packed, ilv)
    t = te.placeholder(packed.shape, "int32", name="codes")
    out = te.compute((n, k), lambda i, j: intdot.code_at(t, i.astype("int64"), j.astype("int64"), lanes, bits, ilv))
    f = tvm.compile(tvm.IRModule({"main": te.create_prim_func([t, out]).with_attr("global_symbol", "main")}),
                    target="llvm").jit()["main"]
    y = tvm.runtime.tensor(np.zeros((n, k), np.int32))
    f(tvm.runtime.tensor(packed), y)
    assert np.array_equal(y.numpy(), raw.numpy() + intdot.code_offset(bits, signed))



def _quantize_and_multiply(qf, lf, x, halves, w, codes, scales, mins):
    """(the kernel's y, the exact integer scheme's) for activations ``x`` run through the
    quantize kernel ``qf`` and the linear ``lf`` over dequantized weights ``w``."""
    m, k = x.shape
    bufs = [tvm.runtime.tensor(np.zeros(sh, dt)) for sh, dt in (((m, k // 4), np.int32), ((m, k // 32), np.float32),
                                                                ((m, halves * k // 32), np.float32))]
    qf(tvm.runtime.tensor(x.numpy()), *bufs)
    y = tvm.runtime.tensor(np.full((m, w.shape[0]), np.nan, np.float32))
    lf(*bufs, codes, scales, mins, y)
    xb = x.numpy().reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    qx = np.round(xb * np.where(amax > 0, 127 / np.maximum(amax, 1e-30), 0)) * (amax / 127)
    return y.numpy(), qx.reshape(m, k) @ w.T


@pytest.mark.parametrize("isa,bits,signed,mins", [_case("avx512vnni", 6, True, False), _case("avx2", 6, True, False),
                                                  _case("avx512vnni", 4, False, True), _case("avx2", 4, False, True),
                                                  # Q3_K (4-bit signed), IQ2_XS/IQ2_S (8-bit), IQ1_M/NVFP4 (5-bit signed)
                                                  _case("avx2", 4, True, False), _case("avx2", 8, True, False),
                                                  _case("avx512vnni", 8, True, False), _case("avx2", 5, True, False),
                                                  _case("avx512bw", 4, True, False, slow=True),
                                                  _case("avx2", 5, False, True, slow=True)])
def test_groups_of_16_scale_each_half_block(isa, bits, signed, mins):
    """Weight groups of 16 (Q6_K's, Q2_K's, Q3_K's, IQ2_XS's sub-blocks): each half of a 32-block has its own scale (and
    min) and its own activation sum (quantize_rows with halves=2), on GEMM and GEMV tiles; the
    kernel equals the exact integer scheme."""
    mcpu, spec = ISAS[isa]
    n, k, L = 96, 128, spec.lanes
    assert intdot.eligible(bits, 16, n, k, spec) and intdot.halves(16) == 2
    g = torch.Generator().manual_seed(bits * 7 + signed)
    lo, hi = code_range(bits, signed)
    codes = pack_codes(torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int32), bits, signed)
    scales = (torch.rand(n, k // 16, generator=g) * 0.02).half()
    mn = (torch.randn(n, k // 16, generator=g) * 0.05).half() if mins else None
    w = dequantize(codes, scales, mn, bits=bits, group_size=16, signed=signed).numpy()
    sb = intdot.storage_bits(bits)
    packed = intdot.repack_any(codes.numpy(), L, bits, signed)
    qf = _compile(intdot.quantize_rows_kernel(k, halves=2), mcpu)
    for m, decode in ((11, False), (3, False), (1, True)):  # 3: the row loop (FEW_ROWS)
        ilv = intdot.weight_interleave(spec, n, sb)
        s = tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_groups(scales.numpy(), L), ilv))
        mt = tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_groups(mn.numpy(), L), ilv)) if mins else s
        lf = _compile(intdot.intdot_linear_kernel(spec, n, k, 16, signed, mins, "float16", decode, bits=sb, ilv=ilv), mcpu)
        got, exact = _quantize_and_multiply(qf, lf, torch.randn(m, k, generator=g), 2, w,
                                            tvm.runtime.tensor(intdot.interleave_blocks(packed, ilv)), s, mt)
        assert np.abs(got - exact).max() <= 1e-5 * (1 + np.abs(exact).max()), (m, decode)


IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@pytest.mark.parametrize("isa,group,codebook", [_case("avx2", 32, IQ4), _case("avx2", 16, E2M1),
                                                _case("avx512vnni", 32, IQ4), _case("avx512vnni", 16, E2M1),
                                                _case("avxvnni", 32, E2M1, slow=True)])
def test_codebook_indices_are_looked_up(isa, group, codebook):
    """4-bit codes that index a codebook (IQ4_NL/IQ4_XS, MXFP4/NVFP4): one vpshufb per nibble
    vector turns them into 8-bit codes, and the kernel equals the exact integer scheme on GEMM,
    few-row and GEMV tiles (AArch64's tbl: test_aarch64_qemu.py); not eligible where 8-bit codes
    are not."""
    mcpu, spec = ISAS[isa]
    n, k, L = 128, 256, spec.lanes
    assert intdot.eligible(4, group, n, k, spec, codebook)
    assert not intdot.eligible(4, group, n, k, intdot.IntDotIsa("avx512bw", 16, 32), codebook)  # no 8-bit dot there
    g = torch.Generator().manual_seed(group + len(set(codebook)))
    codes = pack_codes(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32), 4, False)
    scales = (torch.randn(n, k // group, generator=g) * 0.01).float()  # IQ4_XS: signed fp32 sub-block scales
    w = dequantize(codes, scales, None, bits=4, group_size=group, signed=False, codebook=codebook).numpy()
    packed = intdot.repack_any(codes.numpy(), L, 4, False)
    h = intdot.halves(group)
    qf = _compile(intdot.quantize_rows_kernel(k, halves=h), mcpu)
    for m, decode in ((9, False), (2, False), (1, True)):
        ilv = intdot.weight_interleave(spec, n, 4)
        s = tvm.runtime.tensor(intdot.interleave_blocks(intdot.repack_groups(scales.numpy(), L), ilv))
        lf = _compile(intdot.intdot_linear_kernel(spec, n, k, group, False, False, "float32", decode, ilv=ilv,
                                                  codebook=codebook), mcpu)
        got, exact = _quantize_and_multiply(qf, lf, torch.randn(m, k, generator=g), h, w,
                                            tvm.runtime.tensor(intdot.interleave_blocks(packed, ilv)), s, s)
        assert np.abs(got - exact).max() <= 1e-5 * (1 + np.abs(exact).max()), (m, decode)
