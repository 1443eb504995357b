"""The meaning of llmc's quantized-weight layout (codes + per-group scales [+ mins]).

It lives in the IR because ``quantized_linear`` and ``quantized_embedding`` are defined by it:
the interpreter dequantizes with :func:`dequantize` and the frontend/passes pack with
:func:`pack_codes`. Storage (row-major along K, per output row n):

  bits == 4: ``u8 [N, K/2]``; element ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the
             high nibble; signed codes are stored as ``code + 8``.
  bits 5..8: one code per byte: ``i8 [N, K]`` when signed, ``u8 [N, K]`` when not.
  scales, mins: ``f32`` or ``f16`` ``[N, K / group_size]``; ``w = scale * code (+ min)`` in f32.
  codebook (optional, 4-bit unsigned codes only): 16 int8 values; the stored code is an index
  and ``w = scale * codebook[code] (+ min)`` (GGUF's IQ4_NL/IQ4_XS values, MXFP4's e2m1 values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def codes_dtype(bits: int, signed: bool) -> str:
    """The IR dtype of stored codes."""
    return "u8" if bits == 4 or not signed else "i8"


def codes_cols(k: int, bits: int) -> int:
    """Stored columns of a row of ``k`` codes."""
    return k // 2 if bits == 4 else k


def unpack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes ``[N, K]`` (int32) from the stored form."""
    if bits == 4:
        c = codes.to(torch.int32)
        out = torch.stack([c & 0x0F, c >> 4], dim=-1).reshape(codes.shape[0], -1)
        return out - 8 if signed else out
    return codes.to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The stored form of integer codes ``[N, K]`` (inverse of :func:`unpack_codes`)."""
    lo, hi = code_range(bits, signed)
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise ValueError(f"codes out of range [{lo}, {hi}] for {bits}-bit {'signed' if signed else 'unsigned'}")
    if bits == 4:
        u = (codes + 8 if signed else codes).to(torch.uint8)
        if u.shape[-1] % 2:
            raise ValueError(f"4-bit codes need an even row length, got {u.shape[-1]}")
        return u[:, 0::2] | (u[:, 1::2] << 4)
    return codes.to(torch.int8 if signed else torch.uint8)


def dequantize(codes, scales, mins, *, bits: int, group_size: int, signed: bool, codebook=None) -> torch.Tensor:
    """The reference meaning of the layout: f32 ``w[n, k] = scale[n, g] * code[n, k] (+ min[n, g])``,
    with ``codebook[code]`` in place of the code where there is a codebook."""
    q = unpack_codes(codes, bits, signed)
    if codebook is not None:
        q = torch.tensor(list(codebook), dtype=torch.int32)[q.to(torch.int64)]
    q = q.to(torch.float32)
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    w = scales.to(torch.float32).unsqueeze(-1) * q
    if mins is not None:
        w = w + mins.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k)


# Candidate grids of the symmetric search: the group's signed extreme e is mapped to code
# -(2^(b-1) + d) for each d (d = 0 is GGML's Q4_0 rule; d > 0 clips e, d < 0 leaves room).
SEARCH_OFFSETS = tuple(x / 4 for x in range(-4, 9))  # -1.0 .. 2.0 in quarters: 13 grids
_CHUNK_ELEMENTS = 1 << 18  # rows searched at a time: temporaries stay in cache (2.5x faster than whole)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _symmetric_search(g: torch.Tensor, bits: int, importance: Optional[torch.Tensor],
                      scale_dtype: torch.dtype):
    """Codes and (``scale_dtype``-exact) scales of groups ``g [R, n_groups, G]`` with the least
    weighted squared error ``sum(importance * (w - scale * code)^2)`` among candidate scales.

    For each grid of :data:`SEARCH_OFFSETS` the codes it rounds to get their weighted
    least-squares scale ``sum(i w q) / sum(i q q)``, whose error is ``sum(i w w) - sum(i w q)^2
    / sum(i q q)`` (so a candidate costs a few passes over the weight: the idea of llama.cpp's
    make_qx_quants, written for tensors). The best one is rounded to ``scale_dtype``, its codes
    re-rounded with the rounded scale, and kept only where its stored error is no worse than
    that of the plain max-abs scale ``e / -2^(b-1)``: no group ends worse than max-abs.
    ``importance``: ``[n_groups, G]`` per input channel (e.g. mean x^2 over calibration
    text), or None for the plain squared error."""
    lo, hi = code_range(bits, True)
    half = -lo
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))
    unit = g / _nonzero(extreme)  # in [-1, 1], the extreme at 1
    wg = g if importance is None else g * importance

    def weighted(q):  # sum(i q w), sum(i q q)
        wq = q if importance is None else q * importance
        return (q * wg).sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True)

    best_gain, best_scale = None, None
    for d in SEARCH_OFFSETS:
        q = torch.round(unit * -(half + d)).clamp_(lo, hi)
        qw, qq = weighted(q)
        gain = qw * qw / qq.clamp(min=1e-30)  # sum(i w w) minus the error of the LS scale
        scale = qw / qq.clamp(min=1e-30)
        if best_gain is None:
            best_gain, best_scale = gain, scale
        else:
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_scale = torch.where(better, scale, best_scale)

    def stored(scale):  # rounded scale, its codes, weighted error
        scale = scale.to(scale_dtype).to(torch.float32)
        q = torch.round(g / _nonzero(scale)).clamp_(lo, hi)
        r = g - scale * q
        return scale, q, ((r * r) if importance is None else (r * r * importance)).sum(-1, keepdim=True)

    scale, codes, err = stored(best_scale)
    base_scale, base_codes, base_err = stored(extreme / -half)
    keep = base_err <= err
    codes = torch.where(keep, base_codes, codes)
    scale = torch.where(keep, base_scale, scale)
    return codes.to(torch.int32), scale.squeeze(-1)


def quantize_weight(w: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                    scale_dtype: torch.dtype = torch.float16, importance: Optional[torch.Tensor] = None):
    """Per-group quantization of a float ``[N, K]`` weight into the layout.

    Symmetric: codes in ``[-2^(b-1), 2^(b-1)-1]``, the scale chosen per group by a search
    (:func:`_symmetric_search`) for the least squared error, weighted per input channel by
    ``importance`` (``[K]``, non-negative; None: unweighted).
    Asymmetric: ``code = round((w - min) / s)`` in ``[0, 2^b - 1]`` with ``s = (max - min) / (2^b - 1)``.
    Scales (and mins) are rounded to ``scale_dtype`` first and the codes computed from the
    rounded values, so dequantization sees exactly the scales it is given. Returns
    ``(codes, scales, mins or None)``.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"row length {k} is not a multiple of group_size {group_size}")
    if importance is not None:
        importance = importance.detach().to(torch.float32).reshape(-1)
        if importance.numel() != k or bool((importance < 0).any()) or not bool(torch.isfinite(importance).all()):
            raise ValueError(f"importance must be {k} finite non-negative values (one per input channel)")
        importance = importance.reshape(k // group_size, group_size) / importance.mean().clamp(min=1e-30)
    g = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        rows = max(1, _CHUNK_ELEMENTS // k)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of small ops: threads gain little, and stall on a busy machine
        try:
            parts = [_symmetric_search(g[r:r + rows], bits, importance, scale_dtype) for r in range(0, n, rows)]
        finally:
            torch.set_num_threads(threads)
        codes = torch.cat([c for c, _ in parts])
        scale = torch.cat([s for _, s in parts])
        mins = None
    else:
        qmax = (1 << bits) - 1
        lo = g.amin(-1).to(scale_dtype).to(torch.float32)
        scale = ((g.amax(-1) - lo) / qmax).to(scale_dtype).to(torch.float32)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round((g - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, qmax).to(torch.int32)
        mins = lo.to(scale_dtype)
    packed = pack_codes(codes.reshape(n, k), bits, signed=symmetric)
    return packed, scale.to(scale_dtype), mins


@dataclass
class QuantWeight:
    """A weight ``[N, K]`` as integer codes plus per-group fp32 scales (and mins)."""

    codes: torch.Tensor  # see the module docstring for the storage of each bit width
    scales: torch.Tensor  # f32 or f16 [N, K / group_size] (f16 only where that is exact)
    mins: Optional[torch.Tensor]  # like scales, or None (symmetric)
    bits: int
    group_size: int
    signed: bool
    source: str = ""  # the GGUF block type or quantization scheme it came from
    codebook: Optional[tuple[int, ...]] = None  # 4-bit codes index these 16 int8 values

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[0], self.scales.shape[1] * self.group_size)

    def rows(self, index: torch.Tensor) -> "QuantWeight":
        """The rows ``index`` (a permutation or gather of output features), codes untouched."""
        return QuantWeight(self.codes[index], self.scales[index],
                           None if self.mins is None else self.mins[index],
                           self.bits, self.group_size, self.signed, self.source, self.codebook)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.mins, bits=self.bits,
                          group_size=self.group_size, signed=self.signed, codebook=self.codebook)
