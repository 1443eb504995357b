"""GGUF blocks repacked into llmc's layout dequantize to exactly gguf.quants.dequantize."""

import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmc.compiler.frontend.gguf_scaled_codes import available
from llmc.compiler.frontend.gguf_weights import (QUANT_TYPES, float_tensor, pack_codes, repack_blocks,
                                                 unpack_codes)
from tests.frontend import gguf_random

N, K = 6, 512
SCALED = tuple(available())  # the scaled-code types the installed gguf can dequantize


def random_blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every field (all code bit patterns) with finite super-scales."""
    return gguf_random.random_blocks(name, N, K, rng)


def check_exact(raw: np.ndarray, name: str):
    qw = repack_blocks(raw, name, (N, K))
    ref = torch.from_numpy(gguf_dequantize(raw, GT[name]).astype(np.float32))
    got = qw.dequantize()
    assert got.shape == ref.shape == (N, K)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref), f"{name}: max diff {(got - ref).abs().max()}"
    return qw


@pytest.mark.parametrize("name", [t for t in QUANT_TYPES if t not in SCALED or t in available()])
def test_random_blocks_dequantize_exactly(name):
    qw = check_exact(random_blocks(name, np.random.default_rng(sum(map(ord, name)))), name)
    assert qw.source == name
    if name in ('Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'TQ1_0', 'TQ2_0', 'IQ4_NL'):  # the file's fp16 scale itself
        assert qw.scales.dtype == torch.float16
    elif name not in ("MXFP4", "NVFP4"):  # products of a scale and sub-scales (MX: powers of two, fp16 when in range)
        assert qw.scales.dtype == torch.float32
    assert qw.codes.dtype in (torch.uint8, torch.int8)


# the integer values each scaled-code type's weights are made of (scale * value)
CODE_VALUES = {"Q2_K": range(0, 4), "Q3_K": range(-4, 4), "TQ1_0": range(-1, 2), "TQ2_0": range(-1, 3),  # TQ2_0: 2 bits, 3 unused by llama.cpp
              
               "MXFP4": (0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12),
               "NVFP4": (0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12),
               "IQ1_S": (-9, -7, -1, 1, 7, 9), "IQ1_M": (-9, -7, -1, 1, 7, 9),
               "IQ2_XXS": (-43, -25, -8, 8, 25, 43), "IQ2_XS": (-43, -25, -8, 8, 25, 43), "IQ2_S": (-43, -25, -8, 8, 25, 43),
               "IQ3_XXS": (4, 12, 20, 28, 36, 44, 52, 62, -4, -12, -20, -28, -36, -44, -52, -62),
               "IQ3_S": tuple(range(-15, 16, 2)),
               "IQ4_NL": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
               "IQ4_XS": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)}


@pytest.mark.parametrize("name", SCALED)
def test_scaled_types_decode_their_own_scales(name):
    """The codes recovered by division are the type's own integers (grid points, codebook
    values, 2/3-bit codes), every one of them occurring, i.e. the decoded scales are the file's
    and not a multiple or fraction of them that happens to divide exactly."""
    qw = check_exact(random_blocks(name, np.random.default_rng(7)), name)
    codes = unpack_codes(qw.codes, qw.bits, qw.signed).flatten().tolist()
    if qw.codebook is not None:  # IQ4, MXFP4, NVFP4: 4-bit indices into the type's own values
        assert qw.bits == 4 and not qw.signed and len(qw.codebook) == 16
        codes = [qw.codebook[c] for c in codes]
    assert set(codes) == set(CODE_VALUES[name])


def test_scaled_types_use_gguf_values_of_published_files():
    """gguf's own quantizers (where it has one) give blocks that repack exactly too."""
    w = np.random.default_rng(4).standard_normal((N, K)).astype(np.float32)
    for name in ("TQ1_0", "TQ2_0", "MXFP4"):
        if name in SCALED:
            check_exact(gguf_quantize(np.clip(w, -1, 1) if name.startswith("TQ") else w, GT[name]), name)


def test_a_value_no_scale_reaches_is_refused():
    raw = random_blocks("IQ4_NL", np.random.default_rng(5))
    raw[0, 2] ^= 0  # untouched: exact
    check_exact(raw, "IQ4_NL")
    raw[0, :2] = np.array([np.inf], np.float16).view(np.uint8)  # an infinite scale: inf * 0 is NaN
    with pytest.raises(ValueError, match="not scale \\* integer code"):
        repack_blocks(raw, "IQ4_NL", (N, K))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_quantized_weights_dequantize_exactly(name):
    w = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    check_exact(gguf_quantize(w, GT[name]), name)


def test_layout_per_type():
    rng = np.random.default_rng(2)
    expect = {"Q4_0": (4, 32, True, False), "Q4_1": (4, 32, False, True), "Q5_0": (5, 32, True, False),
              "Q5_1": (5, 32, False, True), "Q8_0": (8, 32, True, False),
              "Q4_K": (4, 32, False, True), "Q5_K": (5, 32, False, True), "Q6_K": (6, 16, True, False),
              "Q2_K": (4, 16, False, True), "Q3_K": (4, 16, True, False), "TQ2_0": (4, 256, True, False),
              "MXFP4": (4, 32, False, False), "IQ1_M": (5, 16, True, False), "IQ2_XS": (8, 16, True, False),
              "IQ4_XS": (4, 32, False, False)}
    for name, (bits, group, signed, has_mins) in expect.items():
        qw = repack_blocks(random_blocks(name, rng), name, (N, K))
        assert (qw.bits, qw.group_size, qw.signed, qw.mins is not None) == (bits, group, signed, has_mins)
        assert qw.codes.shape == (N, K // 2 if bits == 4 else K)
        assert qw.scales.shape == (N, K // group)


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (5, False), (6, True), (8, True), (8, False)])
def test_pack_unpack_roundtrip(bits, signed):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = torch.randint(lo, hi + 1, (3, 64), dtype=torch.int32)
    assert torch.equal(unpack_codes(pack_codes(codes, bits, signed), bits, signed), codes)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(codes.clone().fill_(hi + 1), bits, signed)


def test_float_types_keep_their_dtype():
    w = torch.randn(4, 8)
    assert torch.equal(float_tensor(w.numpy().view(np.uint8), "F32", (4, 8)), w)
    h = w.half()
    assert float_tensor(h.numpy(), "F16", (4, 8)).dtype == torch.float16
    b = w.bfloat16()
    raw = gguf_quantize(w.numpy(), GT.BF16)
    got = float_tensor(raw, "BF16", (4, 8))
    assert got.dtype == torch.bfloat16 and torch.equal(got, b)
    assert torch.equal(got.float(), torch.from_numpy(gguf_dequantize(raw, GT.BF16)))


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="not supported"):
        repack_blocks(np.zeros((1, 292), np.uint8), "Q8_K", (1, 256))
    with pytest.raises(ValueError, match="multiple of its block size"):
        repack_blocks(np.zeros((1, 18), np.uint8), "Q4_0", (1, 16))


def test_gguf_blocks_map_hf_names_and_undo_the_head_permutation(tmp_path, caplog):
    """A tiny llama GGUF: blocks are matched to HF names, q/k rows un-permuted, a tied LM head
    reads token_embd, a weight that does not dequantize to the given float one is declined, and
    a block type llmc does not read is reported as staying float."""
    from gguf import GGUFWriter

    from llmc.compiler.driver import _report_gguf_blocks
    from llmc.compiler.frontend.gguf_weights import GgufBlocks, _head_permutation

    rng = np.random.default_rng(3)
    heads, kv_heads, dim, vocab = 4, 2, 64, 96
    q_hf = rng.standard_normal((dim, dim)).astype(np.float32)
    k_hf = rng.standard_normal((dim // 2, dim)).astype(np.float32)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    inv_q = torch.argsort(_head_permutation(dim, heads)).numpy()  # llama.cpp's permutation
    inv_k = torch.argsort(_head_permutation(dim // 2, kv_heads)).numpy()
    path = str(tmp_path / "tiny.gguf")
    w = GGUFWriter(path, "llama")
    blocks = {"blk.0.attn_q.weight": gguf_quantize(q_hf[inv_q], GT.Q4_1),
              "blk.0.attn_k.weight": gguf_quantize(k_hf[inv_k], GT.Q8_0),
              "token_embd.weight": gguf_quantize(emb, GT.Q4_0)}
    types = {"blk.0.attn_q.weight": GT.Q4_1, "blk.0.attn_k.weight": GT.Q8_0, "token_embd.weight": GT.Q4_0}
    for name, raw in blocks.items():
        w.add_tensor(name, raw, raw_dtype=types[name])
    # a block type llmc does not read (Q8_K, llama.cpp's activation type: 292 bytes per 256): it must be reported
    w.add_tensor("blk.0.ffn_up.weight", rng.integers(0, 256, (8, 292), dtype=np.uint8), raw_dtype=GT.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def loaded(name, perm=None):  # what transformers' loader yields: dequantized, rows un-permuted
        x = torch.from_numpy(gguf_dequantize(blocks[name], types[name]).astype(np.float32))
        return x if perm is None else x[perm]

    prov = GgufBlocks(path, {"num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads})
    q_w = loaded("blk.0.attn_q.weight", _head_permutation(dim, heads))
    qw = prov("model.layers.0.self_attn.q_proj.weight", q_w)
    assert qw is not None and qw.source == "Q4_1" and torch.equal(qw.dequantize(), q_w)
    k_w = loaded("blk.0.attn_k.weight", _head_permutation(dim // 2, kv_heads))
    assert torch.equal(prov("model.layers.0.self_attn.k_proj.weight", k_w).dequantize(), k_w)
    head = prov("lm_head.weight", loaded("token_embd.weight"))
    assert head is not None and head.source == "Q4_0"
    assert prov("model.layers.0.self_attn.q_proj.weight", q_w + 1e-3) is None  # not this file's weight
    assert "model.layers.0.self_attn.q_proj.weight" in prov.declined
    assert prov("model.layers.0.mlp.up_proj.weight", torch.zeros(8, 256)) is None  # Q8_K: not read
    assert prov("model.layers.0.mlp.gate_proj.weight", torch.zeros(8, 64)) is None  # not in the file
    assert prov.kept() == {"Q4_0": 1, "Q4_1": 1, "Q8_0": 1}
    assert prov.inflated() == {"blk.0.ffn_up.weight": "Q8_K"}
    with caplog.at_level(logging.INFO):
        _report_gguf_blocks(prov)
    assert "GGUF blocks kept: Q4_0 x1, Q4_1 x1, Q8_0 x1" in caplog.text
    assert "1 quantized GGUF tensors stay float in the artifact (Q8_K x1; first: blk.0.ffn_up.weight)" in caplog.text
