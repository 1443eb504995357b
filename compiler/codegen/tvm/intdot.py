"""Quantized linears as integer dot products: int8 activations times 4-bit weight codes.

Why: dequantizing every 4-bit code to float costs ~6 instructions per 16 weights before the
FMA (the float path of ``kernels.dequantized``); an integer dot product instruction multiplies
64 (AVX-512 VNNI ``vpdpbusd``) or 32 (AVX2 ``vpmaddubsw``) unsigned codes by signed int8
activations and sums them in one or two instructions. The activations are quantized at run
time per row and per block of 32 (``d = max|x| / 127``, ``q = round(x / d)``, the scheme of
llama.cpp's Q8 activation blocks), which is what lets the weights stay integers:

    y[r, n] = sum_g  s[n, g] * (d[r, g] * dot_g(u, q) - off * d[r, g] * sum_g(q)) + m[n, g] * d[r, g] * sum_g(q)

with ``u`` the stored unsigned code (``code + 8`` for signed 4-bit: ``off = 8``), ``s`` the
scale and ``m`` the min of the group (0 without mins). Every 32-block of activations meets one
weight group (group sizes 32, 64, 128 all hold whole blocks), or two of 16 (Q6_K's sub-blocks):
then each half of the block has its own dot product, scale and activation sum (``halves``).

Weight layout (``repack_codes``), per block of L output columns (L = i32 lanes of a vector:
16 on AVX-512, 8 on AVX2) and per 32-block g of K: 4 chunks of 4L bytes; byte ``4c + i`` of
chunk j holds column c's code ``32g + 4j + i`` in its low nibble and ``32g + 16 + 4j + i`` in
its high nibble. One vector load gives L columns x 8 codes: the low nibbles meet the 4
activations of k-quad j broadcast to every lane, the high nibbles those of k-quad j + 4.
Scales and mins keep their dtype in the ``[N/L, K/group, L]`` blocked layout.

Chosen per CPU (``int_dot_isa``): AVX-512 VNNI, else AVX-512BW or AVX2 (``vpmaddubsw`` into
int16, exact here: 8 products of a 4-bit code and an int8 sum to at most 8 * 2 * 15 * 127 <
2^15, then one ``vpmaddwd`` per group); AArch64 with the dot product extension (``sdot``,
Armv8.2 dotprod: Neoverse N1, Cortex-A76 and later, Apple M1) takes 128-bit NEON vectors of 4
int32 lanes, with ``usdot`` (u8 x s8, like ``vpdpbusd``) where the CPU also has i8mm; other
CPUs keep the float path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from tvm import tirx as tir
from tvm.script import tirx as T

from .attention import prefetch_to_l2
from .memo import memoized_kernel

BLOCK = 32  # activations quantized per block of 32 along K
_F32X = {4: T.float32x4, 8: T.float32x8, 16: T.float32x16}


@dataclass(frozen=True)
class IntDotIsa:
    """How this CPU multiplies u8 x s8 into int32 lanes."""

    name: str        # "avx512vnni", "avx512bw", "avxvnni", "avx2", "neoni8mm" or "neondot"
    lanes: int       # int32 lanes per vector = output columns per weight block
    registers: int   # vector registers (decides the register tile)

    @property
    def bits(self) -> int:
        return self.lanes * 32

    @property
    def vnni(self) -> bool:
        """``vpdpbusd`` (u8 x s8 summed into int32 in one instruction): AVX-512 VNNI on zmm,
        AVX-VNNI on ymm (Alder Lake and later, Zen 5), and AArch64's i8mm ``usdot``."""
        return self.name in ("avx512vnni", "avxvnni", "neoni8mm")

    @property
    def neon(self) -> bool:
        """AArch64 ``sdot``/``usdot``: s8 (or u8) x s8, 4 products summed into each int32 lane."""
        return self.name in ("neondot", "neoni8mm")

    @property
    def int32_dot(self) -> bool:
        """The dot step sums into int32 lanes (no int16 pairs to widen, ``_finish_dot``)."""
        return self.vnni or self.neon


def int_dot_isa(arch: str, flags) -> Optional[IntDotIsa]:
    """The integer dot product the target's features allow (None: keep the float kernels)."""
    flags = set(flags)
    if arch == "aarch64":
        # /proc/cpuinfo names (llvm_cpu.CPUINFO_FLAGS): asimddp = dotprod, i8mm = usdot
        if "asimddp" not in flags:
            return None
        return IntDotIsa("neoni8mm" if "i8mm" in flags else "neondot", 4, 32)
    if arch != "x86_64":
        return None
    if {"avx512_vnni", "avx512bw"} <= flags:
        return IntDotIsa("avx512vnni", 16, 32)
    if "avx512bw" in flags:
        return IntDotIsa("avx512bw", 16, 32)
    if {"avx_vnni", "avx2"} <= flags:
        return IntDotIsa("avxvnni", 8, 16)
    if "avx2" in flags:
        return IntDotIsa("avx2", 8, 16)
    return None


def storage_bits(bits: int) -> int:
    """Bits per code in the integer kernels' layout: 4-bit codes as nibbles; 5- and 6-bit codes
    (Q5_0/Q5_1/Q5_K, Q6_K) as the same nibbles plus one or two bit planes (``repack_code_planes``:
    5.0 / 6.0 bits a weight, not the 8 of one code per byte); 7- and 8-bit codes one per byte
    (the 8-bit kernels; the signed +128 offset of ``repack_codes8`` holds for any byte code)."""
    return bits if bits in (4, 5, 6) else 8


def eligible(bits: int, group: int, n, k, isa: Optional[IntDotIsa], codebook=None) -> bool:
    """Whether a quantized_linear of this layout and shape runs on the integer kernels: 4-bit
    codes everywhere; 8-bit with VNNI or i8mm (``vpdpbusd``/``usdot`` sum into int32), AVX2 or
    NEON dotprod (the sign trick of ``_dot_update8``); AVX-512BW has no 512-bit ``psignb``, and
    ``vpmaddubsw`` alone would saturate int16 on codes up to 255. 4-bit codebook indices
    (``_lookup``: a ``vpshufb`` or ``tbl`` turns them into 8-bit codes) where 8-bit codes run."""
    bits = storage_bits(bits)
    if codebook is not None and not (isa is not None and (isa.neon or isa.vnni or isa.name == "avx2")):
        return False
    ok_bits = bits in (4, 5, 6) or (bits == 8 and isa is not None and (isa.vnni or isa.neon or isa.name == "avx2"))
    return (isa is not None and ok_bits and (group % BLOCK == 0 or group == BLOCK // 2) and isinstance(n, int)
            and isinstance(k, int) and n % isa.lanes == 0 and k % BLOCK == 0 and k % group == 0)


def halves(group: int) -> int:
    """Weight groups per 32-block of activations: 2 for groups of 16 (each half of a block is
    scaled apart), else 1."""
    return 2 if group == BLOCK // 2 else 1


def code_offset(bits: int, signed: bool) -> int:
    """What the stored unsigned code exceeds the signed code by (0 for unsigned codes)."""
    return (1 << (bits - 1)) if signed else 0


# ------------------------------------------------------------------------------ weight layout

def repack_codes(codes: np.ndarray, lanes: int) -> np.ndarray:
    """llmc's 4-bit codes ``[N, K/2]`` (element 2j low nibble of byte j) → ``[N/L, K/32, 4L]``
    int32 (each int32 lane holds one column's 4 bytes of a chunk, little-endian)."""
    n, half = codes.shape
    k = half * 2
    u = np.empty((n, k), np.uint8)
    u[:, 0::2] = codes & 0x0F
    u[:, 1::2] = codes >> 4
    # [N/L, L, G, 2 halves, 4 chunks, 4 bytes] -> [N/L, G, chunk, L, byte], half 0 low, half 1 high
    v = u.reshape(n // lanes, lanes, k // BLOCK, 2, 4, 4)
    lo, hi = v[:, :, :, 0], v[:, :, :, 1]
    packed = (lo | (hi << 4)).transpose(0, 2, 3, 1, 4)  # [N/L, G, chunk, L, 4]
    return np.ascontiguousarray(packed.reshape(n // lanes, k // BLOCK, 16 * lanes)).view(np.int32)


def repack_code_planes(codes: np.ndarray, lanes: int, bits: int, signed: bool) -> np.ndarray:
    """5- or 6-bit codes ``[N, K]`` (one per byte, ``ir.quant``) → ``[N/L, K/32, bits*L]`` int32:
    the low 4 bits of the unsigned code (``code + 2^(bits-1)`` if signed) in ``repack_codes``'s
    4L words, then ``bits - 4`` words per lane holding the high bits, arranged so that the bits
    chunk j needs sit at the same place in every byte (one shift and one mask put them under the
    nibbles, ``_group_dot``). 5-bit: one word; byte i bit j holds element 4j + i's bit 4, bit
    j + 4 element 16 + 4j + i's. 6-bit: a word per half block; byte i bits 2j, 2j + 1 hold bits
    4 and 5 of element 4j + i of that half."""
    n, k = codes.shape
    u = codes.astype(np.int16) + (1 << (bits - 1) if signed else 0)
    if u.min() < 0 or u.max() >= 1 << bits:
        raise ValueError(f"{bits}-bit codes out of range")
    u = u.astype(np.uint8)
    nibbles = repack_codes(((u[:, 0::2] & 15) | ((u[:, 1::2] & 15) << 4)).astype(np.uint8), lanes)
    high = (u >> 4).astype(np.uint32).reshape(n, k // BLOCK, BLOCK)  # bits 4.. of each code
    words = []
    if bits == 5:
        both = np.arange(BLOCK)
        position = (both % 4) * 8 + (both % 16) // 4 + 4 * (both // 16)
        words.append((high << position.astype(np.uint32)).sum(-1, dtype=np.uint64))
    else:
        e = np.arange(16)
        position = (e % 4) * 8 + 2 * (e // 4)
        for half in range(2):
            words.append((high[..., 16 * half:16 * half + 16] << position.astype(np.uint32)).sum(-1, dtype=np.uint64))
    planes = [w.astype(np.uint32).reshape(n // lanes, lanes, k // BLOCK).transpose(0, 2, 1).view(np.int32)
              for w in words]  # each [N/L, G, L]
    return np.ascontiguousarray(np.concatenate([nibbles] + planes, axis=-1))


def repack_any(codes: np.ndarray, lanes: int, bits: int, signed: bool) -> np.ndarray:
    """Stored codes (``ir.quant``'s form for ``bits``) → the integer kernels' layout of
    ``storage_bits(bits)``."""
    sb = storage_bits(bits)
    if sb == 4:
        return repack_codes(codes, lanes)
    if sb in (5, 6):
        return repack_code_planes(codes, lanes, sb, signed)
    return repack_codes8(codes, lanes, signed)


def repack_codes8(codes: np.ndarray, lanes: int, signed: bool) -> np.ndarray:
    """8-bit codes ``[N, K]`` → ``[N/L, K/32, 8L]`` int32: chunk j (0..7) of a 32-block holds,
    in lane c, column c's codes ``32g + 4j .. 32g + 4j + 3`` as unsigned bytes (+128 if signed)."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + 128).astype(np.uint8) if signed else codes.astype(np.uint8)
    v = u.reshape(n // lanes, lanes, k // BLOCK, 8, 4).transpose(0, 2, 3, 1, 4)  # [N/L, G, chunk, L, 4]
    return np.ascontiguousarray(v.reshape(n // lanes, k // BLOCK, 32 * lanes)).view(np.int32)


def weight_interleave(isa: IntDotIsa, n: int, bits: int) -> int:
    """Column blocks stored interleaved per 32-block (``interleave_blocks``): the decode tile's
    width, so a one-row GEMV work item reads its codes, scales and mins as three sequential
    streams (the hardware prefetchers then keep up: cold decode GEMVs 15-30% faster on Zen 4,
    AVX2 and VNNI alike, than C separate streams 2.3 KB apart)."""
    return tiles(isa, n, True, bits)[1]


def interleave_blocks(array: np.ndarray, ilv: int) -> np.ndarray:
    """``[NB, G, X]`` → ``[NB/ilv, G, ilv*X]``: column block b's row g at ``[b // ilv, g,
    (b % ilv) * X ...]``, so the ilv blocks of a tile lie side by side for each 32-block."""
    if ilv == 1:
        return array
    nb, g, x = array.shape
    return np.ascontiguousarray(array.reshape(nb // ilv, ilv, g, x).transpose(0, 2, 1, 3).reshape(nb // ilv, g, ilv * x))


def repack_groups(scales: np.ndarray, lanes: int) -> np.ndarray:
    """Per-group scales or mins ``[N, G]`` → ``[N/L, G, L]``."""
    n, g = scales.shape
    return np.ascontiguousarray(scales.reshape(n // lanes, lanes, g).transpose(0, 2, 1))


def code_at(codes, n, k, lanes: int, bits: int, ilv: int = 1):
    """The stored (unsigned) code of column n, element k, as a TIR expression of the repacked
    int32 layout (for the embedding gather of a table the LM head shares)."""
    g, r = k // BLOCK, k % BLOCK
    b = n // lanes
    base = (b % ilv) * bits * lanes + n % lanes
    if bits in (4, 5, 6):
        half, j, i = r // 16, (r % 16) // 4, r % 4
        word = codes[b // ilv, g, base + j * lanes]
        code = (word >> (i * 8 + half * 4).astype("int32")) & tir.const(15, "int32")
        if bits == 5:
            plane = codes[b // ilv, g, base + 4 * lanes]
            code = code | (((plane >> (i * 8 + j + 4 * half).astype("int32")) & tir.const(1, "int32")) << 4)
        elif bits == 6:
            plane = codes[b // ilv, g, base + (4 + half) * lanes]
            code = code | (((plane >> (i * 8 + 2 * j).astype("int32")) & tir.const(3, "int32")) << 4)
        return code
    else:
        j, i = r // 4, r % 4
        word = codes[b // ilv, g, base + j * lanes]
        shift, mask = i * 8, 255
    return (word >> shift.astype("int32")) & tir.const(mask, "int32")


# ------------------------------------------------------------------------------ kernels

@memoized_kernel
def quantize_rows_kernel(k: int, parallel: bool = True, halves: int = 1):
    """x f32 [M, K] → (q: int8 x4 packed in i32 [M, K/4], d: f32 [M, K/32], ds: d * sum(q)).
    ``parallel=False`` for decode: one row is cheaper than waking the thread pool. ``halves=2``:
    ds per 16 activations ([M, K/16]), for weights grouped by 16."""
    G = k // BLOCK
    H = halves

    @T.prim_func(private=True, check_well_formed=False)
    def quantize_rows(var_x: T.handle, var_q: T.handle, var_d: T.handle, var_ds: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "quantize_rows"})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        q = T.match_buffer(var_q, (m, k // 4), "int32")
        d = T.match_buffer(var_d, (m, G), "float32")
        ds = T.match_buffer(var_ds, (m, G * H), "float32")
        with T.sblock("root"):  # RewriteDataflowReshape inspects one-input kernels' root block
            for r in (T.parallel(m) if parallel else T.serial(m)):
                for g in range(G):
                    # T.let and "global" (stack) buffers: see intdot_linear_kernel
                    amax = T.alloc_buffer((1,), "float32", scope="global")
                    qs = T.alloc_buffer((BLOCK,), "int32", scope="global")
                    total = T.alloc_buffer((H,), "int32", scope="global")
                    part = T.alloc_buffer((8,), "float32", scope="global")  # 8 lanes of |x| maxima
                    for i in T.vectorized(8):
                        part[i] = T.max(T.max(T.abs(x[r, g * BLOCK + i]), T.abs(x[r, g * BLOCK + 8 + i])),
                                        T.max(T.abs(x[r, g * BLOCK + 16 + i]), T.abs(x[r, g * BLOCK + 24 + i])))
                    amax[0] = T.float32(0)
                    for i in range(8):
                        amax[0] = T.max(amax[0], part[i])
                    scale: T.let[T.float32] = amax[0] / T.float32(127)
                    inv: T.let[T.float32] = T.Select(amax[0] > T.float32(0),
                                                     T.float32(127) / T.max(amax[0], T.float32(1e-30)), T.float32(0))
                    for i in T.vectorized(BLOCK):
                        qs[i] = T.Cast("int32", T.round(x[r, g * BLOCK + i] * inv))
                    tpart = T.alloc_buffer((H, 8), "int32", scope="global")
                    for h in range(H):
                        if H == 1:
                            for i in T.vectorized(8):
                                tpart[h, i] = qs[i] + qs[8 + i] + qs[16 + i] + qs[24 + i]
                        else:
                            for i in T.vectorized(8):
                                tpart[h, i] = qs[16 * h + i] + qs[16 * h + 8 + i]
                        total[h] = 0
                        for i in range(8):
                            total[h] = total[h] + tpart[h, i]
                    for i in T.vectorized(BLOCK // 4):
                        q[r, g * 8 + i] = ((qs[4 * i] & 255) | T.shift_left(qs[4 * i + 1] & 255, 8)
                                           | T.shift_left(qs[4 * i + 2] & 255, 16) | T.shift_left(qs[4 * i + 3], 24))
                    d[r, g] = scale
                    for h in range(H):
                        ds[r, g * H + h] = scale * T.Cast("float32", total[h])

    return quantize_rows


def _dot_update(isa: IntDotIsa, acc, codes_i32, act_i32):
    """acc (int32 lanes; int16 pairs for the pmaddubsw ISAs) += codes (u8) x act (s8), 4-bit codes
    or VNNI. int16 accumulation is exact for up to 8 updates per 32-block: a pair sum is at most
    2 * 15 * 127 = 3810 (activations lie in [-127, 127], ``quantize_rows``), 8 of them 30480 < 2^15.
    NEON ``sdot`` reads both operands signed: 4-bit codes (0..15) are the same bytes either way."""
    L = isa.lanes
    c8 = T.reinterpret(f"int8x{4 * L}", codes_i32)
    a8 = T.reinterpret(f"int8x{4 * L}", act_i32)
    if isa.neon:
        return _neon_dot(isa.vnni, acc, c8, a8)
    if isa.vnni:
        return T.call_llvm_pure_intrin(f"int32x{L}", f"llvm.x86.avx512.vpdpbusd.{isa.bits}", acc, c8, a8)
    name = "llvm.x86.avx512.pmaddubs.w.512" if L == 16 else "llvm.x86.avx2.pmadd.ub.sw"
    return acc + T.call_llvm_pure_intrin(f"int16x{2 * L}", name, c8, a8)


def _neon_dot(unsigned_codes: bool, acc, c8, a8):
    """AArch64 int32x4 acc += 4-byte dot products per lane: ``usdot`` (i8mm; codes u8, as
    ``vpdpbusd``) or ``sdot`` (dotprod; codes read as s8)."""
    name = "llvm.aarch64.neon.usdot" if unsigned_codes else "llvm.aarch64.neon.sdot"
    return T.call_llvm_pure_intrin("int32x4", name, acc, c8, a8)


def _dot_update8(isa: IntDotIsa, acc, codes_i32, act_i32, stored: bool = True):
    """int32 acc += (code - 128) x act for 8-bit stored codes u (0..255), by the sign trick.
    AVX2: pmaddubsw(|s|, sign(s) * a) with s = u - 128 as int8. |s| <= 128 and |a| <= 127, so a
    pair sum is at most 2 * 128 * 127 = 32512 < 2^15 (no saturation); pmaddwd widens every chunk.
    NEON dotprod: ``sdot`` on s = u ^ 0x80 (= u - 128 as int8) directly, into int32.
    ``stored=False``: the codes are already s (a codebook looked up as signed values)."""
    flip = T.broadcast(T.int32(-0x7F7F7F80 if stored else 0), isa.lanes)  # 0x80808080
    if isa.neon:
        return _neon_dot(False, acc, T.reinterpret("int8x16", codes_i32 ^ flip), T.reinterpret("int8x16", act_i32))
    s8 = T.reinterpret("int8x32", codes_i32 ^ flip)
    a8 = T.reinterpret("int8x32", act_i32)
    mag = T.max(s8, T.broadcast(T.int8(0), 32) - s8)  # abs; -128 stays 0x80 = 128 unsigned
    signed_a = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", a8, s8)
    pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", mag, signed_a)
    return acc + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), 16))


def _finish_dot(isa: IntDotIsa, acc):
    """int32 lanes of a group's dot product from the accumulator form of ``_dot_update``."""
    L = isa.lanes
    if isa.int32_dot:
        return acc
    name = "llvm.x86.avx512.pmaddw.d.512" if L == 16 else "llvm.x86.avx2.pmadd.wd"
    return T.call_llvm_pure_intrin(f"int32x{L}", name, acc, T.broadcast(T.int16(1), 2 * L))


def _int16_updates(bits: int) -> int:
    """``vpmaddubsw`` updates an int16 accumulator takes before it could saturate: a pair sum is
    at most 2 * (2^bits - 1) * 127 (4-bit 3810: all 8 of a 32-block; 5-bit 4; 6-bit 2)."""
    return 32767 // (2 * ((1 << bits) - 1) * 127)


def lut_words(codebook, lanes: int, offset: int = 128) -> list[int]:
    """int32 lanes of the ``vpshufb`` table: byte ``i`` of every 16-byte lane holds
    ``codebook[i] + offset``: 128 gives the stored form of a signed 8-bit code (``repack_codes8``,
    for ``vpdpbusd``/``usdot``), 0 the signed code itself (for the sign trick)."""
    u = np.array([(v + offset) & 0xFF for v in codebook], np.uint8)
    words = u.view("<i4").tolist()
    return [words[i % 4] for i in range(lanes)]


def _lookup(isa: IntDotIsa, codebook, nibbles, offset: int = 128):
    """Bytes 0..15 of ``nibbles`` (int32 lanes of 4 indices) -> their codebook values + ``offset``: one
    ``vpshufb`` with the 16-entry table in every 128-bit lane (AVX2 ymm, AVX-512 zmm), or one
    NEON ``tbl`` (AArch64, one 128-bit vector)."""
    L = isa.lanes
    table = tir.Shuffle([tir.const(w, "int32") for w in lut_words(codebook, L, offset)],
                        [tir.const(i, "int32") for i in range(L)])
    if isa.neon:
        name = "llvm.aarch64.neon.tbl1.v16i8"
    else:
        name = "llvm.x86.avx512.pshuf.b.512" if L == 16 else "llvm.x86.avx2.pshuf.b"
    b = f"int8x{4 * L}"
    return T.reinterpret(f"int32x{L}", T.call_llvm_pure_intrin(b, name, T.reinterpret(b, table), T.reinterpret(b, nibbles)))


def _group_dot(isa: IntDotIsa, bits: int, codes, q, block, g, row, sign_trick: bool, ilv: int = 1,
               half: Optional[int] = None, codebook=None):
    """One (row, column block, 32-block) integer dot product as a single expression, in int32
    lanes: the accumulator chain lives in registers only (no accumulator array that LLVM zeroes
    and reloads from the stack every group). ``half`` 0 or 1: only elements 0-15 or 16-31
    (nibble layouts: the low or the high nibbles; 8-bit: chunks 0-3 or 4-7), for groups of 16.

    5- and 6-bit codes: each nibble vector gains its high bits from the plane words
    (``repack_code_planes``) with one shift and one mask (an AND-OR, one ``vpternlogd``). On the int16 ISAs a chain is cut
    every ``_int16_updates`` updates and the parts are widened and summed."""
    L = isa.lanes
    int32_acc = isa.int32_dot or sign_trick
    # with the sign trick a codebook's table holds the signed values themselves: no flip per update
    # (AVX2, all IQ4 linears of a layer: 2-5% faster at 8 rows, 10% at one than looking up u = v + 128)
    signed_lookup = codebook is not None and sign_trick
    zero = tir.Broadcast(tir.const(0, "int32" if int32_acc else "int16"), L if int32_acc else 2 * L)

    W = bits * L

    def codes_at(j):
        if ilv == 1:
            return tir.BufferLoad(codes, [block, g, tir.Ramp(tir.const(j * L, "int64"), tir.const(1, "int64"), L)])
        return tir.BufferLoad(codes, [block // ilv, g, tir.Ramp((block % ilv) * W + j * L, tir.const(1, "int64"), L)])

    def act(j):
        return tir.Broadcast(q[row, g * 8 + j], L)

    def const(v):
        return tir.Broadcast(tir.const(v, "int32"), L)

    def shifted(word, by):  # word << by (>> -by): no bit crosses into a masked place (repack_code_planes)
        return tir.shift_left(word, const(by)) if by >= 0 else tir.shift_right(word, const(-by))

    updates = []  # (half, code vector, activation word), in accumulation order
    if bits in (4, 5, 6):
        planes = [codes_at(4 + p) for p in range(bits - 4)]
        for j in range(4):
            v = codes_at(j)
            lo, hi = v & const(0x0F0F0F0F), tir.shift_right(v, const(4)) & const(0x0F0F0F0F)
            if bits == 5:  # bit j (low half) and j + 4 (high half) of every byte -> bit 4
                lo = lo | (shifted(planes[0], 4 - j) & const(0x10101010))
                hi = hi | (shifted(planes[0], -j) & const(0x10101010))
            elif bits == 6:  # bits 2j, 2j + 1 of every byte of the half's word -> bits 4, 5
                lo = lo | (shifted(planes[0], 4 - 2 * j) & const(0x30303030))
                hi = hi | (shifted(planes[1], 4 - 2 * j) & const(0x30303030))
            if codebook is not None:  # indices -> 8-bit codes, dotted as 8-bit ones
                offset = 0 if signed_lookup else 128
                lo, hi = _lookup(isa, codebook, lo, offset), _lookup(isa, codebook, hi, offset)
            updates += [(0, lo, act(j)), (1, hi, act(4 + j))]
    else:
        updates = [(j // 4, codes_at(j), act(j)) for j in range(8)]
    mine = [u for u in updates if half is None or u[0] == half]
    per = len(mine) if int32_acc else _int16_updates(bits)
    total = None
    for start in range(0, len(mine), per):
        acc = zero
        for _, vec, a in mine[start:start + per]:
            acc = (_dot_update8(isa, acc, vec, a, stored=not signed_lookup) if sign_trick
                   else _dot_update(isa, acc, vec, a))
        part = acc if int32_acc else _finish_dot(isa, acc)
        total = part if total is None else total + part
    return total


def tiles(isa: IntDotIsa, n: int, decode: bool, bits: int = 4) -> tuple[int, int]:
    """(rows, column blocks) of a register tile, from the register count: each (row, block)
    needs an integer and a float accumulator, each block two code vectors; a quarter of the
    registers stay for broadcasts and scales. Of equal tiles the taller one wins (AVX2: 4x1
    over 2x2, measured ~5-10% faster: a code vector's unpacking serves more rows, and the
    activation broadcasts it no longer shares are loads). Decode (one row) widens the tile
    instead, as wide as the registers hold (a block's two accumulators, plus ~6 shared: the
    code vector pair, two broadcasts, the nibble mask): each activation broadcast and each
    group's scale step then serve more columns, and the one-row GEMV runs on instruction
    throughput, not only memory (one thread, SmolLM2's shapes: AVX-512 8 blocks 20-30% faster
    than 4, AVX2 4 blocks 1.4-1.7x faster than 2), keeping at least 4 work items for the
    threads. 8-bit codes (the LM head) stream one column block at a time (1x1 measured 1.3-2x
    faster than 1x2 at 49152 x 576, AVX2 and VNNI alike).

    VNNI, measured on Zen 4 (2 threads, interleaved A/B, SmolLM2's four linear shapes): 8 x 1
    blocks for 4-bit codes at M >= 8. The 8 x 2 tile this replaced kept 16 float accumulators
    and 16 unpacked code vectors live and spilled ~120 stack accesses per iteration; 8 x 1 fits
    the 32 registers. All linears of an 8-row step: 5.3-5.7 vs 6.6-6.9 ms with the weights from
    DRAM, 3.3 vs 4.0-4.4 ms cache-resident; 16 rows 7.4 vs 8.8 ms (DRAM), 6.0 vs 7.4 (cached);
    512 rows (prefill) 12-27% less per call. 8-bit codes (the LM head of a batch) take 8 x 1
    on every ISA: one thread's CPU time at 49152 x 576, M = 8, 16, 64, against 2 x 8 (VNNI)
    and 4 x 1 (AVX2): 1.9-2.3 vs 3.3-3.9 ms, 4.2 vs 5.2 ms, 13.9 vs 15.6 ms (VNNI), 4.1 vs 4.8
    ms at M = 8 (AVX2). Fewer rows take ``small_tiles`` and ``FEW_ROWS``. A group's integer dot product is one expression (``_group_dot``), so a tile
    holds float accumulators only.

    AArch64 (32 NEON registers of 4 lanes) takes VNNI's rules unchanged; they are only checked
    for correctness under emulation (qemu), never timed on a real AArch64 core."""
    blocks = n // isa.lanes
    if decode:
        if bits == 8:
            return 1, 1
        for c in (8, 6, 4, 2, 1):
            if blocks % c == 0 and blocks // c >= 4 and 2 * c + 6 <= isa.registers:
                return 1, c
        return 1, 1
    # NEON: VNNI's tiles by analogy (int32 dots, 32 registers; not measured)
    if bits == 8 or isa.name == "avx512vnni" or isa.neon:
        return 8, 1
    budget = isa.registers * 3 // 4
    best = (1, 1)
    for c in (1, 2):
        if blocks % c:
            continue
        for r in (4, 3, 2, 1):
            if 2 * r * c + 2 * c <= budget and r * c > best[0] * best[1]:
                best = (r, c)
    return best


def small_tiles(rows: int) -> Optional[tuple[int, int]]:
    """The tile for ``FEW_ROWS`` < M <= ``SMALL_ROWS`` (a batch of 4 decode tokens), or None when
    the big tile is small already. 4 x 1: at M = 4 the step's linears take 2.0 ms against 4 x 2's
    2.3 cache-resident, 5.1 against 5.0 with the weights from DRAM (2 threads, Zen 4). Above 4
    rows the big 8-row tile does better than two 4-row ones, clamped rows and all (each 4-row
    tile streams every weight from DRAM again): all 4-bit linears of a 6-row step 6.28 ms
    against 7.88 (VNNI, Zen 4, 2 threads, interleaved A/B)."""
    if rows <= SMALL_ROWS:
        return None
    return SMALL_ROWS, 1


SMALL_ROWS = 4

# At most this many rows (2-3 decode tokens in a batch: a few clients, or one speculative
# request checking its guesses) take the one-row decode tile, one row after the other: a
# thread's consecutive work items are the rows under one weight tile, so the first row streams
# the weights in the decode tile's interleaved order (sequential, which the hardware
# prefetchers follow) and the others read them again from L2, where a taller tile walks one
# column block of each interleaved group, 2 KB apart, and computes clamped rows. Interleaved
# A/B (benchmarks/small_batch.py), all 4-bit linears of a SmolLM2 step with the weights from
# DRAM, 2 threads, Zen 4: 2 rows 3.15 vs 4.36 ms (VNNI 4 x 1), 3 rows 4.45 vs 4.88; x86-64-v3
# (AVX2 4 x 1): 2 rows 4.28 vs 6.39, 3 rows 7.21 vs 9.63; the 8-bit LM head (49152 x 576): 2 rows
# 0.94 vs 1.38 (VNNI 8 x 1), 1.24 vs 2.97 (AVX2). At 4 rows the 4 x 1 tile wins on VNNI (4.71 vs
# 5.20), so it stops at 3.
FEW_ROWS = 3


def batch_prefetch(isa: IntDotIsa) -> int:
    """32-blocks ahead a decode batch's tiles (at most one tile of rows: every weight read once,
    from DRAM) prefetch their codes, scales and mins. The hardware prefetchers do not keep up
    with a tile's strided walk (``weight_interleave`` lays the column blocks of a decode tile
    side by side, so a batch tile steps ilv x 256 bytes per 32-block, and a 576-deep item is
    only 18 steps long). VNNI, Zen 4, 2 threads, all 4-bit linears of an 8-row step with the
    weights from DRAM (huge pages, interleaved A/B, three runs): 5.6 -> 5.1, 5.7 -> 5.2, 5.6 ->
    4.5 ms; 6 rows 4.9 -> 4.4; cache-resident unchanged. Whole 8-sequence steps of SmolLM2
    (benchmarks/step_profile.py, two artifacts in lockstep): 12.75 -> 11.82 and 13.20 -> 12.45 ms.
    8 ahead measured no worse than 2, 4, 6 or 12; a branch instead of the clamp made the loop 2x
    slower (AVX2). Tall steps (prefill) keep the tile without it (prefill-128/512 unchanged). The
    8-bit LM head (not interleaved: a contiguous walk) measured 15% slower with it alone (49152 x
    576, 8 rows, 1.07-1.20 vs 1.25-1.47 ms, six pairs), yet whole steps without it for that kernel
    only were 0.1 ms slower (three lockstep triples: 11.93 / 12.03, 14.47 / 14.56, 13.12 / 13.25
    ms, against 13.43 / 16.50 / 14.44 with no prefetch at all), so it keeps it.
    AVX2 (4-row tiles): 12% slower at 4 rows, so none; NEON is not measured, so none."""
    return 8 if isa.vnni and not isa.neon else 0


def _silu(v):
    """x * sigmoid(x) with the vectorizing polynomial exp (exp of -|x| only: no overflow)."""
    from .attention import fast_exp

    e = fast_exp(-tir.abs(v))
    one = tir.const(1.0, "float32")
    return v * tir.Select(v >= tir.const(0.0, "float32"), one / (one + e), e / (one + e))


@T.macro
def _half_groups(isa, R, L, bits, codes, q, d, ds, scales, mins, facc, m, ct, r0, C, c, g, ilv, off, has_mins,
                 sign_trick, codebook):
    """A 32-block of column block ``ct * C + c`` against weight groups of 16: two dot products,
    each with its own scale, activation sum (and min)."""
    col: T.let[T.int64] = (ct * C + c) % ilv * L
    s0: T.let[_F32X[L]] = T.Cast(f"float32x{L}", scales[(ct * C + c) // ilv, 2 * g, T.ramp(col, 1, L)])
    s1: T.let[_F32X[L]] = T.Cast(f"float32x{L}", scales[(ct * C + c) // ilv, 2 * g + 1, T.ramp(col, 1, L)])
    for r in T.unroll(R):
        row: T.let[T.int64] = T.min(r0 + r, m - 1)
        dg: T.let[_F32X[L]] = T.broadcast(d[row, g], L)
        ds0: T.let[_F32X[L]] = T.broadcast(ds[row, 2 * g], L)
        ds1: T.let[_F32X[L]] = T.broadcast(ds[row, 2 * g + 1], L)
        dot0: T.let[_F32X[L]] = T.Cast(f"float32x{L}", _group_dot(isa, bits, codes, q, ct * C + c, g, row, sign_trick,
                                                                  ilv, 0, codebook))
        dot1: T.let[_F32X[L]] = T.Cast(f"float32x{L}", _group_dot(isa, bits, codes, q, ct * C + c, g, row, sign_trick,
                                                                  ilv, 1, codebook))
        t0: T.let[_F32X[L]] = dot0 * dg - T.broadcast(T.float32(off), L) * ds0
        t1: T.let[_F32X[L]] = dot1 * dg - T.broadcast(T.float32(off), L) * ds1
        if has_mins:
            facc[r, c, T.ramp(0, 1, L)] = (facc[r, c, T.ramp(0, 1, L)] + s0 * t0 + s1 * t1
                                           + T.Cast(f"float32x{L}", mins[(ct * C + c) // ilv, 2 * g, T.ramp(col, 1, L)]) * ds0
                                           + T.Cast(f"float32x{L}", mins[(ct * C + c) // ilv, 2 * g + 1, T.ramp(col, 1, L)]) * ds1)
        else:
            facc[r, c, T.ramp(0, 1, L)] = facc[r, c, T.ramp(0, 1, L)] + s0 * t0 + s1 * t1


def _tile_macro(isa: IntDotIsa, R: int, C: int, k: int, group: int, signed: bool, has_mins: bool, bits: int,
                glu: bool, ilv: int = 1, prefetch: int = 0, codebook=None):
    """The work of one parallel item: R rows from r0 x C column blocks from block ct * C, over all
    of K; ``glu``: y = silu(x · w) * up instead of y = x · w.

    Every name bound here is a ``T.let``: a plain TVMScript assignment is a mutable scalar that
    FlattenBuffer turns into a "local" buffer, which LowerTVMBuiltin allocates from the
    workspace pool on every work item (AllocWorkspace calls per tile: the AVX2 prefill GEMM ran
    6x slower). The accumulators are "global"-scope buffers for the same reason: constant-size
    ones under 1 KiB become stack allocas, which LLVM keeps in registers."""
    L = isa.lanes
    H = halves(group)
    G, GS = k // BLOCK, max(group // BLOCK, 1)
    off = float(code_offset(8, True) if codebook is not None else code_offset(bits, signed))
    # AVX2 8-bit (and codebook values, 8-bit after the lookup): dot of (u - 128), so the offset shifts by 128
    sign_trick = (bits == 8 or codebook is not None) and not isa.vnni
    if sign_trick:
        off -= 128.0
    W = bits * L  # int32 words of codes per column block and 32-block
    AHEAD = int(prefetch)
    LINE = 64 // 4  # int32 words per 64-byte cache line
    CODE_LINES = (W + LINE - 1) // LINE

    @T.macro
    def tile(q, d, ds, codes, scales, mins, y, up, m, ct, r0):
        facc = T.alloc_buffer((R, C, L), "float32", scope="global")
        for r, c in T.grid(R, C):
            for l in T.vectorized(L):
                facc[r, c, l] = T.float32(0)
        for g in range(G):
            if AHEAD > 0:  # a Python constant: the parser keeps only the taken branch
                # clamped, not branched: the last groups fetch the last one again (a branch in
                # this loop made the AVX2 tiles 2x slower)
                ga: T.let[T.int32] = T.min(g + AHEAD, G - 1)
                for c in T.unroll(C):
                    for x in T.unroll(CODE_LINES):
                        prefetch_to_l2(T.address_of(codes[(ct * C + c) // ilv, ga, (ct * C + c) % ilv * W + x * LINE]))
                    prefetch_to_l2(T.address_of(scales[(ct * C + c) // ilv, ga // GS * H, (ct * C + c) % ilv * L]))
                    if has_mins:
                        prefetch_to_l2(T.address_of(mins[(ct * C + c) // ilv, ga // GS * H, (ct * C + c) % ilv * L]))
            if H == 2:
                for c in T.unroll(C):
                    _half_groups(isa, R, L, bits, codes, q, d, ds, scales, mins, facc, m, ct, r0, C, c, g, ilv,
                                 off, has_mins, sign_trick, codebook)
            else:
                for c in T.unroll(C):
                    s: T.let[_F32X[L]] = T.Cast(f"float32x{L}", scales[(ct * C + c) // ilv, g // GS,
                                                                        T.ramp((ct * C + c) % ilv * L, 1, L)])
                    for r in T.unroll(R):
                        row: T.let[T.int64] = T.min(r0 + r, m - 1)
                        dot: T.let[_F32X[L]] = T.Cast(f"float32x{L}", _group_dot(isa, bits, codes, q, ct * C + c, g,
                                                                                 row, sign_trick, ilv, None, codebook))
                        dg: T.let[_F32X[L]] = T.broadcast(d[row, g], L)
                        dsg: T.let[_F32X[L]] = T.broadcast(ds[row, g], L)
                        if off != 0.0:
                            t: T.let[_F32X[L]] = dot * dg - T.broadcast(T.float32(off), L) * dsg
                        else:
                            t: T.let[_F32X[L]] = dot * dg
                        if has_mins:
                            facc[r, c, T.ramp(0, 1, L)] = (facc[r, c, T.ramp(0, 1, L)] + s * t
                                                           + T.Cast(f"float32x{L}", mins[(ct * C + c) // ilv, g // GS,
                                                                                         T.ramp((ct * C + c) % ilv * L,
                                                                                                1, L)]) * dsg)
                        else:
                            facc[r, c, T.ramp(0, 1, L)] = facc[r, c, T.ramp(0, 1, L)] + s * t
        for r in T.unroll(R):
            if r0 + r < m:
                for c in T.unroll(C):
                    for l in T.vectorized(L):
                        if glu:
                            y[r0 + r, (ct * C + c) * L + l] = (_silu(facc[r, c, l])
                                                               * up[r0 + r, (ct * C + c) * L + l])
                        else:
                            y[r0 + r, (ct * C + c) * L + l] = facc[r, c, l]

    return tile


@memoized_kernel
def intdot_linear_kernel(isa: IntDotIsa, n: int, k: int, group: int, signed: bool, has_mins: bool,
                         scale_dtype: str, decode: bool, threads: int = 2, glu: bool = False, bits: int = 4,
                         tile: Optional[tuple[int, int]] = None, ilv: int = 1, prefetch: Optional[int] = None,
                         codebook: Optional[tuple[int, ...]] = None):
    """y f32 [M, N] = x · w for 4-bit codes in the repacked layout, x given by ``quantize_rows``;
    ``glu``: y = silu(x · w) * up (the gated MLP's epilogue, ``up`` an extra [M, N] input).

    A parallel work item is a tile of R rows x C blocks of L columns; items of one column tile
    are consecutive, so a thread walks down the rows under one weight tile (reused from cache).
    Rows past M re-read the last row and are not written. ``prefetch``: 32-blocks ahead a step
    of at most one tile of rows prefetches (default ``batch_prefetch``; 0: none). ``codebook``:
    the 4-bit codes are indices into these 16 int8 values (IQ4_NL/IQ4_XS, MXFP4: ``_lookup``)."""
    L = isa.lanes
    R, C = tile or tiles(isa, n, decode, bits)  # ``tile``: an explicit (rows, blocks), for measuring
    small_tile = None if tile or decode else small_tiles(R)
    G, NB = k // BLOCK, n // L
    H = halves(group)
    W = bits * L  # int32 words of codes per column block and 32-block
    del threads

    ahead = batch_prefetch(isa) if prefetch is None else prefetch

    def make_body(R: int, C: int, ahead: int = 0):
        tile_fn = _tile_macro(isa, R, C, k, group, signed, has_mins, bits, glu, ilv, ahead, codebook)

        @T.macro
        def body(q, d, ds, codes, scales, mins, y, up, m):
            row_tiles: T.let[T.int64] = (m + R - 1) // R  # T.let: see _tile_macro
            for item in T.parallel((NB // C) * row_tiles):
                tile_fn(q, d, ds, codes, scales, mins, y, up, m, item // row_tiles, item % row_tiles * R)

        return body

    # Taller than one tile (a prompt chunk): each weight tile serves several row tiles from the
    # cache, no prefetching. At most one tile of rows (a decode batch): every weight is read
    # once, from DRAM, so the tile prefetches ``ahead`` 32-blocks (``batch_prefetch``).
    body = make_body(R, C)
    stream = make_body(R, C, ahead) if ahead > 0 and R > 1 and not decode else None
    # a batch of SMALL_ROWS decode tokens: the smaller tile, no half-empty 8-row one
    small = make_body(*small_tile, ahead) if small_tile is not None else None
    # 2-3 rows: the one-row decode tile, row after row (FEW_ROWS)
    few = make_body(*tiles(isa, n, True, bits)) if not (tile or decode) and R > 1 else None

    @T.macro
    def batch(q, d, ds, codes, scales, mins, y, up, m):
        # the Python-constant conditions first: the parser keeps only the taken branches
        if small is None and stream is None:
            body(q, d, ds, codes, scales, mins, y, up, m)
        elif small is None:
            if m > R:
                body(q, d, ds, codes, scales, mins, y, up, m)
            else:
                stream(q, d, ds, codes, scales, mins, y, up, m)
        elif stream is None:
            if m > SMALL_ROWS:
                body(q, d, ds, codes, scales, mins, y, up, m)
            else:
                small(q, d, ds, codes, scales, mins, y, up, m)
        else:
            if m > R:
                body(q, d, ds, codes, scales, mins, y, up, m)
            elif m > SMALL_ROWS:
                stream(q, d, ds, codes, scales, mins, y, up, m)
            else:
                small(q, d, ds, codes, scales, mins, y, up, m)

    @T.macro
    def run(q, d, ds, codes, scales, mins, y, up, m):
        if few is None:
            batch(q, d, ds, codes, scales, mins, y, up, m)
        else:
            if m <= FEW_ROWS:
                few(q, d, ds, codes, scales, mins, y, up, m)
            else:
                batch(q, d, ds, codes, scales, mins, y, up, m)

    if glu:
        @T.prim_func(private=True, check_well_formed=False)
        def intdot_linear_glu(var_q: T.handle, var_d: T.handle, var_ds: T.handle, var_codes: T.handle,
                              var_scales: T.handle, var_mins: T.handle, var_up: T.handle, var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "llmc.kind": "intdot_linear"})
            m = T.int64()
            q = T.match_buffer(var_q, (m, k // 4), "int32")
            d = T.match_buffer(var_d, (m, G), "float32")
            ds = T.match_buffer(var_ds, (m, G * H), "float32")
            codes = T.match_buffer(var_codes, (NB // ilv, G, ilv * W), "int32")
            scales = T.match_buffer(var_scales, (NB // ilv, k // group, ilv * L), scale_dtype)
            mins = T.match_buffer(var_mins, (NB // ilv, k // group, ilv * L), scale_dtype)
            up = T.match_buffer(var_up, (m, n), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            run(q, d, ds, codes, scales, mins, y, up, m)

        return intdot_linear_glu

    @T.prim_func(private=True, check_well_formed=False)
    def intdot_linear(var_q: T.handle, var_d: T.handle, var_ds: T.handle, var_codes: T.handle,
                      var_scales: T.handle, var_mins: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "intdot_linear"})
        m = T.int64()
        q = T.match_buffer(var_q, (m, k // 4), "int32")
        d = T.match_buffer(var_d, (m, G), "float32")
        ds = T.match_buffer(var_ds, (m, G * H), "float32")
        codes = T.match_buffer(var_codes, (NB // ilv, G, ilv * W), "int32")
        scales = T.match_buffer(var_scales, (NB // ilv, k // group, ilv * L), scale_dtype)
        mins = T.match_buffer(var_mins, (NB // ilv, k // group, ilv * L), scale_dtype)
        y = T.match_buffer(var_y, (m, n), "float32")
        run(q, d, ds, codes, scales, mins, y, y, m)

    return intdot_linear
