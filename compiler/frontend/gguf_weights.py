"""GGUF tensors repacked into llmc's one quantized-weight layout, never inflated to float.

Why one layout: every GGUF block type llmc supports (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
Q6_K here; Q2_K, Q3_K, the IQ types, TQ1_0/TQ2_0, MXFP4 and NVFP4 in ``gguf_scaled_codes``)
is, per group of 16 or 32 consecutive weights of a row, ``w = scale * code (+ min)`` with
small integer codes. Repacked once at import into :class:`QuantWeight` (integer codes,
per-group scales and optional per-group mins, fp32 or, where exact, fp16), one kernel family and one IR op
(``quantized_linear``) cover them all, and the ``quantize`` pass emits the same layout.

Exactness: the per-group scale and min are computed here with the very fp32 operations
``gguf.quants.dequantize`` performs (``d * sc``, ``-(dmin * m)``), so the reference
dequantization ``scale * code + min`` equals gguf's result bit for bit (negation is exact,
and ``a - b == a + (-b)`` in IEEE arithmetic).

Code storage (row-major, along K):
  bits == 4: ``u8 [N, K/2]``, element ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the
             high nibble; a signed layout stores ``code + 8``.
  bits 5..8: one code per byte, ``i8 [N, K]`` when signed, ``u8 [N, K]`` when not.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

from ..ir.quant import QuantWeight, dequantize, pack_codes, unpack_codes  # noqa: F401 (re-exported)
from .gguf_scaled_codes import QK_K, SCALED_TYPES, repack_scaled
from .gguf_scaled_codes import f16 as _f16

logger = logging.getLogger("llmc.frontend")


# --------------------------------------------------------------------------- block repacking


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 packed bytes)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _nibble_halves(qs: np.ndarray, half: int) -> np.ndarray:
    """Chunks of ``half`` bytes hold 2*half codes: low nibbles first, then high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, half) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _repack_q4_0(b):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return _nibble_halves(qs, 16).astype(np.int32) - 8, d, None, 4, 32, True


def _repack_q4_1(b):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return _nibble_halves(qs, 16).astype(np.int32), d, m, 4, 32, False


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 codes 0..31: low nibbles as Q4 (16 bytes, 32 codes), bit j of the
    little-endian 32-bit ``qh`` is bit 4 of code j."""
    n = qs.shape[0]
    hi = (np.ascontiguousarray(qh).view("<u4").reshape(n, 1) >> np.arange(32, dtype=np.uint32)) & 1
    return _nibble_halves(qs, 16).astype(np.int32) | (hi.astype(np.int32) << 4)


def _repack_q5_0(b):
    d = _f16(b[:, :2])
    return _five_bit(b[:, 2:6], b[:, 6:]) - 16, d, None, 5, 32, True


def _repack_q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _five_bit(b[:, 4:8], b[:, 8:]), d, m, 5, 32, False


def _repack_q8_0(b):
    d, x = _f16(b[:, :2]), np.ascontiguousarray(b[:, 2:]).view(np.int8)
    return x.astype(np.int32), d, None, 8, 32, True


def _k_scales(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    scale = d * sc.astype(np.float32)
    mn = -(dmin * m.astype(np.float32))
    return scale, mn


def _repack_q4_k(b):
    scale, mn = _k_scales(b)
    return _nibble_halves(b[:, 16:], 32).astype(np.int32), scale, mn, 4, 32, False


def _repack_q5_k(b):
    scale, mn = _k_scales(b)
    n = b.shape[0]
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _nibble_halves(qs, 32).reshape(n, 8, 32)
    hi = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01
    return (ql | (hi << 4)).reshape(n, -1).astype(np.int32), scale, mn, 5, 32, False


def _repack_q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    scale = d * np.ascontiguousarray(sc).view(np.int8).astype(np.float32)
    lo = _nibble_halves(ql, 64).reshape(n, 8, 32)
    hi = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03)
    q = (lo | (hi.reshape(n, 8, 32) << 4)).astype(np.int32) - 32
    return q.reshape(n, -1), scale, None, 6, 16, True


# name -> (block bytes, weights per block, repacker)
_REPACKERS = {
    "Q4_0": (18, 32, _repack_q4_0),
    "Q4_1": (20, 32, _repack_q4_1),
    "Q5_0": (22, 32, _repack_q5_0),
    "Q5_1": (24, 32, _repack_q5_1),
    "Q8_0": (34, 32, _repack_q8_0),
    "Q4_K": (144, QK_K, _repack_q4_k),
    "Q5_K": (176, QK_K, _repack_q5_k),
    "Q6_K": (210, QK_K, _repack_q6_k),
}
_REPACKERS.update({name: (kind.nbytes, kind.per_block, lambda b, name=name: repack_scaled(b, name))
                   for name, kind in SCALED_TYPES.items()})
QUANT_TYPES = tuple(_REPACKERS)
FLOAT_TYPES = ("F32", "F16", "BF16")


def _compact(a: np.ndarray) -> torch.Tensor:
    """fp16 when every value survives the round trip (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 scales are fp16 in the
    file), so the artifact is no bigger than the GGUF; fp32 otherwise (K-quant products)."""
    h = a.astype(np.float16)
    return torch.from_numpy(h if np.array_equal(h.astype(np.float32), a) else a)


def repack_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantWeight:
    """Raw GGUF bytes of a quantized ``[N, K]`` tensor (rows of blocks along K) -> QuantWeight."""
    if type_name not in _REPACKERS:
        raise ValueError(f"GGUF block type {type_name} is not supported; llmc reads "
                         f"{', '.join(QUANT_TYPES)} and {', '.join(FLOAT_TYPES)} (requantize the file with one of them)")
    nbytes, per_block, fn = _REPACKERS[type_name]
    n, k = shape
    if k % per_block:
        raise ValueError(f"{type_name} row length {k} is not a multiple of its block size {per_block}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    if blocks.shape[0] != n * k // per_block:
        raise ValueError(f"{type_name} tensor [{n}, {k}] needs {n * k // per_block} blocks, got {blocks.shape[0]}")
    q, scale, mn, bits, group, signed, *book = fn(blocks)
    codes = pack_codes(torch.from_numpy(q.reshape(n, k)), bits, signed)
    scales = _compact(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, k // group))
    mins = None if mn is None else _compact(np.ascontiguousarray(mn, dtype=np.float32).reshape(n, k // group))
    codebook = tuple(book[0]) if book and book[0] is not None else None
    return QuantWeight(codes, scales, mins, bits, group, signed, source=type_name, codebook=codebook)


def float_tensor(raw: np.ndarray, type_name: str, shape: tuple) -> torch.Tensor:
    """An F32/F16/BF16 GGUF tensor in its own dtype (BF16 is stored as raw u16 words)."""
    if type_name == "F32":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).reshape(shape).copy())
    if type_name == "F16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).reshape(shape).copy())
    if type_name == "BF16":
        words = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).reshape(shape).copy())
        return words.view(torch.bfloat16)
    raise ValueError(f"{type_name} is not a float GGUF type")


def read_gguf_weights(path: str) -> dict[str, Union[QuantWeight, torch.Tensor]]:
    """Every tensor of a GGUF file under its GGUF name: QuantWeight or a float tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out: dict[str, Union[QuantWeight, torch.Tensor]] = {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (K) first
        if type_name in FLOAT_TYPES:
            out[t.name] = float_tensor(t.data, type_name, shape)
        elif len(shape) == 2:
            out[t.name] = repack_blocks(t.data, type_name, shape)
        else:
            raise ValueError(f"tensor {t.name} of type {type_name} has rank {len(shape)}; only 2-D tensors may be quantized")
    return out


# --------------------------------------------------------------------------- GGUF blocks for HF params


def _reader_arch(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _head_permutation(rows: int, heads: int) -> Optional[torch.Tensor]:
    """The row order that undoes llama.cpp's rope permutation of a q/k projection (the
    converter interleaves the two halves of each head; transformers swaps them back)."""
    if heads <= 0 or rows % (2 * heads):
        return None
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


class GgufBlocks:
    """A provider for the quantize pass: the GGUF's own blocks for each HF parameter.

    HF names map to GGUF names through gguf's tensor name map for the file's architecture.
    A candidate is accepted only if it dequantizes to exactly the float weight transformers
    loaded from the same file (which is gguf.quants.dequantize of it), trying the q/k
    head permutations llama.cpp's converter applies; so whatever the architecture, a weight
    is either the file's blocks, bit-exact, or stays float (counted in ``declined``)."""

    def __init__(self, path: str, config: dict):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        reader = GGUFReader(path)
        arch_name = _reader_arch(reader)
        arch = {v: k for k, v in MODEL_ARCH_NAMES.items()}.get(arch_name)
        if arch is None:
            raise ValueError(f"{path}: gguf knows no architecture {arch_name!r}")
        self.names = get_tensor_name_map(arch, int(config.get("num_hidden_layers") or 0))
        self.raw = {t.name: t for t in reader.tensors if t.tensor_type.name in QUANT_TYPES}
        self.file_types = {t.name: t.tensor_type.name for t in reader.tensors}
        heads = int(config.get("num_attention_heads") or 0)
        self.heads = sorted({heads, int(config.get("num_key_value_heads") or heads)})
        self.used: dict[str, str] = {}
        self.declined: list[str] = []

    def quantized_names(self) -> set[str]:
        return set(self.raw)

    def kept(self) -> dict[str, int]:
        """Block type -> how many of the file's tensors the artifact keeps in it."""
        counts: dict[str, int] = {}
        for gname in set(self.used.values()):
            counts[self.file_types[gname]] = counts.get(self.file_types[gname], 0) + 1
        return dict(sorted(counts.items()))

    def inflated(self) -> dict[str, str]:
        """The file's quantized tensors that no weight took (GGUF name -> block type): an
        unsupported block type, a weight declined, or one the model does not read."""
        used = set(self.used.values())
        return {n: t for n, t in self.file_types.items() if t not in FLOAT_TYPES and n not in used}

    def __call__(self, hf_name: str, weight: torch.Tensor) -> Optional[QuantWeight]:
        gname = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname == "output.weight" and gname not in self.raw:
            gname = "token_embd.weight"  # tied embeddings: llama.cpp reads the output from the table
        t = self.raw.get(gname) if gname else None
        if t is None or weight.dim() != 2:
            return None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != tuple(weight.shape):
            self.declined.append(hf_name)
            return None
        try:
            qw = repack_blocks(t.data, t.tensor_type.name, shape)
        except ValueError as e:  # not exactly scale * code (a corrupt block, an older gguf): stays float
            logger.warning("GGUF tensor %s stays float: %s", gname, e)
            self.declined.append(hf_name)
            return None
        want = weight.detach().to(torch.float32)
        got = qw.dequantize()
        if torch.equal(got, want):
            self.used[hf_name] = gname
            return qw
        for heads in self.heads:
            perm = _head_permutation(shape[0], heads)
            if perm is not None and torch.equal(got[perm], want):
                self.used[hf_name] = gname
                return qw.rows(perm)
        self.declined.append(hf_name)
        return None
