"""Block sizes per GPU architecture: the small table the templates are instantiated from.

Values are starting points chosen from each chip's shared memory and register file (no GPU
was available to autotune them); ``interpret`` is for TRITON_INTERPRET=1 on a CPU, where fewer,
larger programs run faster and tile shapes only have to be legal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BlockSizes:
    warp: int                  # threads per warp / wavefront
    gemm: tuple                # (BM, BN, BK, num_warps, num_stages) for prefill GEMMs
    gemm_skinny: tuple         # the same for few-row batches (M <= skinny_max_rows)
    gemv: tuple                # (BN, BK, num_warps) for decode rows (M <= gemv_max_rows)
    elementwise: int = 1024    # elements per program of elementwise and copy kernels
    attn_rows: int = 16        # query tokens per prefill-attention program (times the GQA group)
    attn_warps: int = 4
    attn_keys: int = 64        # keys per attention step (several KV blocks gathered through the block table)
    decode_splits: int = 8     # split-KV partitions of decode attention (a power of two)
    gemv_max_rows: int = 4
    skinny_max_rows: int = 64


ARCH_BLOCKS = {
    # gemv: 16 output rows per program so even a 576-wide projection spreads over 36 programs
    "sm_80": BlockSizes(32, (128, 128, 32, 8, 3), (16, 128, 64, 4, 4), (16, 256, 4)),
    "sm_89": BlockSizes(32, (128, 128, 32, 8, 3), (16, 128, 64, 4, 4), (16, 256, 4)),
    "sm_90": BlockSizes(32, (128, 128, 64, 8, 3), (16, 128, 64, 4, 4), (16, 256, 4), decode_splits=16),
    "gfx90a": BlockSizes(64, (128, 128, 32, 8, 2), (16, 128, 64, 4, 2), (16, 256, 4)),
    "gfx942": BlockSizes(64, (128, 128, 64, 8, 2), (16, 128, 64, 4, 2), (16, 256, 4), decode_splits=16),
    "gfx1100": BlockSizes(32, (64, 128, 32, 4, 2), (16, 64, 64, 4, 2), (16, 256, 4)),
    "interpret": BlockSizes(32, (64, 64, 64, 4, 1), (16, 128, 64, 4, 1), (128, 128, 4), elementwise=4096,
                            attn_rows=16, decode_splits=2),
}

CUDA_ARCHS = ("sm_80", "sm_89", "sm_90")
ROCM_ARCHS = ("gfx90a", "gfx942", "gfx1100")


def blocks_for(arch: str, **overrides) -> BlockSizes:
    if arch not in ARCH_BLOCKS:
        raise KeyError(f"no block sizes for arch '{arch}'; known: {', '.join(sorted(ARCH_BLOCKS))}")
    return replace(ARCH_BLOCKS[arch], **overrides)
