"""Random GGUF blocks of every block type llmc reads, and a tiny llama GGUF file made of them.

Every byte is random (all code, grid, sign and sub-scale bit patterns), except the super-scales,
which are set so the weights have a chosen spread: random fp16 super-scales would give
infinities or weights of 1e4, which no published file has."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

# where each type keeps its fp16 super-scale(s) (byte offsets in a block)
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "TQ1_0": [52], "TQ2_0": [64], "IQ1_S": [0],
          "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0], "IQ4_NL": [0], "IQ4_XS": [0]}


def block_shape(name: str) -> tuple[int, int]:
    """(bytes, weights) of one block."""
    per, nbytes = GGML_QUANT_SIZES[GT[name]]
    return nbytes, per


def _set_scales(raw: np.ndarray, name: str, d: np.ndarray):
    """Write per-block super-scales ``d`` (float) into ``raw`` in the type's own encoding."""
    if name in F16_AT:
        for off in F16_AT[name]:
            raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    elif name == "IQ1_M":  # the fp16 is spread over the top nibbles of the 4 scale words
        bits = d.astype(np.float16).view(np.uint16)
        words = raw[:, 48:56].copy().view("<u2").reshape(-1, 4)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        raw[:, 48:56] = words.view(np.uint8).reshape(-1, 8)
    elif name == "MXFP4":  # e8m0: 2^(e - 128) ("half" scale)
        raw[:, 0] = np.clip(np.round(np.log2(d) + 128), 2, 254).astype(np.uint8)
    elif name == "NVFP4":  # four ue4m3 sub-scales of 16 weights, doubled: e = 7 + log2(2 d)
        e = np.clip(np.round(np.log2(2 * d) + 7), 1, 14).astype(np.uint8)
        raw[:, :4] = ((e << 3).reshape(-1, 1) | (raw[:, :4] & 0x07)).astype(np.uint8)
    else:
        raise KeyError(name)


def random_blocks(name: str, n: int, k: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Raw blocks ``[n, k / per * nbytes]`` of a ``[n, k]`` tensor whose weights have about ``std``."""
    nbytes, per = block_shape(name)
    raw = rng.integers(0, 256, size=(n * k // per, nbytes), dtype=np.uint8)
    _set_scales(raw, name, np.full(raw.shape[0], 2.0 ** -8))
    unit = float(np.std(dequantize(raw, GT[name]))) / 2.0 ** -8 or 1.0
    _set_scales(raw, name, std / unit * rng.uniform(0.5, 1.5, raw.shape[0]))
    return raw.reshape(n, -1)


def write_tiny_llama(path: str, types: list[str], seed: int = 0, hidden: int = 256, ffn: int = 512,
                     layers: int = 2, vocab: int = 256) -> dict[str, str]:
    """A 2-layer llama GGUF (no tokenizer) whose 16 matrices take the block ``types`` in turn;
    returns GGUF tensor name -> block type."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    heads, kv_heads = 4, 2
    w = GGUFWriter(path, "llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    kv = hidden // heads * kv_heads
    mats = [("token_embd.weight", vocab, hidden)]
    for i in range(layers):
        mats += [(f"blk.{i}.attn_q.weight", hidden, hidden), (f"blk.{i}.attn_k.weight", kv, hidden),
                 (f"blk.{i}.attn_v.weight", kv, hidden), (f"blk.{i}.attn_output.weight", hidden, hidden),
                 (f"blk.{i}.ffn_gate.weight", ffn, hidden), (f"blk.{i}.ffn_up.weight", ffn, hidden),
                 (f"blk.{i}.ffn_down.weight", hidden, ffn)]
    mats.append(("output.weight", vocab, hidden))
    chosen = {}
    for j, (name, n, k) in enumerate(mats):
        t = types[j % len(types)]
        # the embedding rows are the model's input: the spread of a real table's (~0.05 in SmolLM2)
        w.add_tensor(name, random_blocks(t, n, k, rng, std=0.05 if "ffn_down" not in name else 0.03),
                     raw_dtype=GT[t])
        chosen[name] = t
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return chosen
