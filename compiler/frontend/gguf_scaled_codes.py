"""GGUF block types read through their scales: Q2_K, Q3_K, the IQ (lattice/codebook) types,
TQ1_0/TQ2_0, MXFP4 and NVFP4.

Each of these is, per group of 16, 32 or 256 weights, ``w = scale * c (+ min)`` where ``c`` is a
small integer: a 2/3-bit code (Q2_K, Q3_K, TQ*), a signed lattice point of a grid (IQ2/IQ3:
grid entries like 8, 25, 43 times a sign; IQ1: ``8 * g +- 1`` over ``scale = dl / 8``), or a
codebook value (IQ4: -127..113; MXFP4/NVFP4: doubled e2m1 values -12..12; these keep their
4-bit index and the codebook, ``QuantWeight.codebook``). Rather than decode
every grid and sign table a second time, llmc decodes only the scales (a few lines per type,
below) and recovers the integer codes from gguf's own dequantization by division; every code is
then checked to reproduce gguf's value bit for bit (``scale * code (+ min)`` in fp32), so a
misread type fails loudly instead of drifting. The codes keep the narrowest width the kernels
run (4, 5 or 8 bits): an IQ2 weight is exact but takes 8 bits a weight in the artifact; an IQ4
one takes its 4.

The scale formulas follow ``gguf.quants`` (and ggml's ``dequantize_row_*``); all of them are
products of an fp16 super-scale and small integers, exact in fp32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

QK_K = 256  # weights in a K-quant / IQ super-block


def f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (two bytes each) of blocks, as fp32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """Bytes -> their 4-bit halves, low nibble first: ``[n, m] -> [n, 2m]``."""
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], -1)


def _q2_k(b):
    sc = b[:, :16]
    d, dmin = f16(b[:, 80:82]), f16(b[:, 82:84])
    return d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))


def _q3_k(b):
    raw, d = b[:, 96:108], f16(b[:, 108:110])
    lo = _nibbles(raw[:, :8])
    lo = np.concatenate([lo[:, 0::2], lo[:, 1::2]], axis=1)  # low nibbles of bytes 0-7, then high
    hi = (raw[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 0x03
    sc = (lo | (hi.reshape(-1, 16) << 4)).astype(np.int32) - 32
    return d * sc.astype(np.float32), None


def _ternary(offset):
    return lambda b: (f16(b[:, offset:offset + 2]), None)


def _mxfp4(b):
    e = b[:, :1].astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32), None


def _nvfp4(b):
    x = b[:, :4].astype(np.int32)
    exp, man = (x >> 3) & 0x0F, (x & 0x07).astype(np.float32)
    normal = np.ldexp(np.float32(1) + man / np.float32(8), exp - 7).astype(np.float32)
    value = np.where(exp == 0, np.ldexp(man, -9).astype(np.float32), normal)
    value = np.where((x == 0) | (x == 0x7F), np.float32(0), value)
    return (value * np.float32(0.5)).astype(np.float32), None


def _iq2_xxs(b):
    d, aux = f16(b[:, :2]), np.ascontiguousarray(b[:, 2:66]).view("<u4").reshape(-1, 8, 2)[..., 1]
    return d * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.25), None


def _iq2_sixteens(scale_at):
    def scales(b):
        d = f16(b[:, :2])
        s = _nibbles(b[:, scale_at:scale_at + 8]).astype(np.float32)
        return d * (np.float32(0.5) + s) * np.float32(0.25), None
    return scales


def _iq3_xxs(b):
    d, aux = f16(b[:, :2]), np.ascontiguousarray(b[:, 66:98]).view("<u4")
    return d * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.5), None


def _iq3_s(b):
    d, s = f16(b[:, :2]), _nibbles(b[:, 106:110]).astype(np.float32)
    return d * (np.float32(1) + np.float32(2) * s), None


def _iq1_s(b):
    d, qh = f16(b[:, :2]), np.ascontiguousarray(b[:, 34:50]).view("<u2")
    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    return dl * np.float32(0.125), None  # codes 8 * grid +- 1


def _iq1_m(b):
    s = np.ascontiguousarray(b[:, 48:56]).view("<u2")
    top = (s & 0xF000) >> np.array([12, 8, 4, 0], np.uint16)
    d = (top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]).view(np.float16).astype(np.float32).reshape(-1, 1)
    sub = ((s.reshape(-1, 4, 1) >> np.array([0, 3, 6, 9], np.uint16).reshape(1, 1, 4)) & 7).reshape(-1, 16)
    return d * (2 * sub + 1).astype(np.float32) * np.float32(0.125), None


def _iq4_nl(b):
    return f16(b[:, :2]), None


def _iq4_xs(b):
    d, h = f16(b[:, :2]), np.ascontiguousarray(b[:, 2:4]).view("<u2")
    lo = _nibbles(b[:, 4:8]).astype(np.int32)
    hi = (h >> (2 * np.arange(8, dtype=np.uint16))) & 3
    return d * ((lo | (hi.astype(np.int32) << 4)) - 32).astype(np.float32), None


IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
E2M1_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # MXFP4/NVFP4 (e2m1 doubled)

class ScaledType(NamedTuple):
    """How llmc stores a GGUF block type read through its scales."""

    nbytes: int          # bytes a block
    per_block: int       # weights a block
    scales_of: Callable  # raw blocks -> (scales [n_blocks, groups], mins or None)
    bits: int            # stored code width
    group: int           # weights a scale
    signed: bool
    codebook: Optional[tuple] = None  # the stored 4-bit code indexes these values (the file's own 4 bits)


SCALED_TYPES = {
    "Q2_K": ScaledType(84, QK_K, _q2_k, 4, 16, False),
    "Q3_K": ScaledType(110, QK_K, _q3_k, 4, 16, True),
    "TQ1_0": ScaledType(54, QK_K, _ternary(52), 4, QK_K, True),
    "TQ2_0": ScaledType(66, QK_K, _ternary(64), 4, QK_K, True),
    "MXFP4": ScaledType(17, 32, _mxfp4, 4, 32, False, E2M1_VALUES),
    "NVFP4": ScaledType(36, 64, _nvfp4, 4, 16, False, E2M1_VALUES),
    "IQ1_S": ScaledType(50, QK_K, _iq1_s, 5, 32, True),
    "IQ1_M": ScaledType(56, QK_K, _iq1_m, 5, 16, True),
    "IQ2_XXS": ScaledType(66, QK_K, _iq2_xxs, 8, 32, True),
    "IQ2_XS": ScaledType(74, QK_K, _iq2_sixteens(66), 8, 16, True),
    "IQ2_S": ScaledType(82, QK_K, _iq2_sixteens(74), 8, 16, True),
    "IQ3_XXS": ScaledType(98, QK_K, _iq3_xxs, 8, 32, True),
    "IQ3_S": ScaledType(110, QK_K, _iq3_s, 5, 32, True),
    "IQ4_NL": ScaledType(18, 32, _iq4_nl, 4, 32, False, IQ4_VALUES),
    "IQ4_XS": ScaledType(136, QK_K, _iq4_xs, 4, 32, False, IQ4_VALUES),
}

_CHUNK_BLOCKS = 1 << 14  # blocks decoded at a time: float64 temporaries stay small


def available() -> dict:
    """The types above that the installed gguf can dequantize (newer types need a newer gguf)."""
    from gguf import GGMLQuantizationType as GT
    from gguf.quants import _type_traits  # noqa: PLC2701 (the registry gguf.quants.dequantize uses)

    return {k: v for k, v in SCALED_TYPES.items() if k in GT.__members__ and GT[k] in _type_traits}


def _codes_of(values: np.ndarray, scale: np.ndarray, mn, name: str) -> np.ndarray:
    """Integer codes with ``scale * code (+ min) == values`` in fp32, bit for bit: the nearest
    integer to ``(value - min) / scale``, or a neighbour where rounding in ``- min`` hid it."""
    v = values.astype(np.float64)
    s = scale.astype(np.float64)
    m = 0.0 if mn is None else mn.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.where(s != 0, np.rint((v - m) / np.where(s != 0, s, 1)), 0)

    def back(q):
        w = scale * q.astype(np.float32)
        return w if mn is None else w + mn

    q = q0
    bad = back(q) != values
    for step in (-1, 1):
        if not bad.any():
            break
        cand = np.where(bad, q0 + step, q)
        fixed = bad & (back(cand) == values)
        q, bad = np.where(fixed, cand, q), bad & ~fixed
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} weights are not scale * integer code "
                         f"(non-finite scales or values in the file?); the tensor cannot be read exactly")
    return q.astype(np.int32)


def _indices(values: np.ndarray, codebook: tuple, name: str) -> np.ndarray:
    """Integer values -> their index in ``codebook`` (the first, where a value repeats)."""
    lo = min(codebook)
    table = np.full(max(codebook) - lo + 1, -1, np.int32)
    for i, v in reversed(list(enumerate(codebook))):
        table[v - lo] = i
    inside = (values >= lo) & (values <= max(codebook))
    idx = np.where(inside, table[np.clip(values - lo, 0, len(table) - 1)], -1)
    if (idx < 0).any():
        raise ValueError(f"{name}: {int((idx < 0).sum())} weights are no value of the type's codebook")
    return idx


def repack_scaled(blocks: np.ndarray, name: str):
    """Raw blocks ``[n_blocks, nbytes]`` of ``name`` -> (codes [n_blocks, per_block] int32,
    scales [n_blocks, groups], mins or None, bits, group, signed, codebook or None)."""
    from gguf import GGMLQuantizationType as GT
    from gguf.quants import dequantize

    kind = SCALED_TYPES[name]
    per_block, group, codebook = kind.per_block, kind.group, kind.codebook
    if name not in available():
        raise ValueError(f"{name} blocks need a newer gguf package (pip install -U gguf) to be read")
    codes, scales, mins = [], [], []
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b = blocks[start:start + _CHUNK_BLOCKS]
        values = dequantize(b, GT[name]).astype(np.float32).reshape(b.shape[0], -1, group)
        scale, mn = kind.scales_of(b)
        scale = np.broadcast_to(scale.reshape(b.shape[0], -1, 1), values.shape[:2] + (1,)).astype(np.float32)
        mn = None if mn is None else mn.reshape(b.shape[0], -1, 1).astype(np.float32)
        ints = _codes_of(values, scale, mn, name).reshape(b.shape[0], per_block)
        if codebook is not None:  # a zero scale makes every value 0: any index serves
            ints = np.where(np.broadcast_to(scale, values.shape).reshape(ints.shape) == 0, codebook[0], ints)
            ints = _indices(ints, codebook, name)
        codes.append(ints)
        scales.append(scale.reshape(b.shape[0], -1))
        mins.append(None if mn is None else mn.reshape(b.shape[0], -1))
    return (np.concatenate(codes), np.concatenate(scales), None if mins[0] is None else np.concatenate(mins),
            kind.bits, group, kind.signed, codebook)
