"""GPTQ: symmetric per-group quantization with second-order error feedback (Frantar et al. 2022).

Why: rounding each weight to its nearest code ignores that a linear's output error is
``(W - Q) X``; with ``H = X^T X`` over calibration inputs, the error of column k can be
partly cancelled by moving the columns not yet quantized. GPTQ quantizes the columns in
order; after column k is rounded, its error divided by ``[H^-1]_kk`` (the upper Cholesky
factor of ``H^-1``) is propagated along row k of that factor to the columns after k. A
group's scale is fixed when its first column is reached, by the same least-squares scale
search as plain rounding (``ir.quant._symmetric_search``, weighted by ``diag(H)``), run on
the group's weights as the earlier errors have updated them.
"""

from __future__ import annotations

import torch

from .ir.quant import _symmetric_search, code_range, pack_codes

DAMP = 0.01  # dampening added to diag(H): this fraction of its mean (the paper's default)
BLOCK = 128  # columns updated lazily as a block (a multiple of every group size)


def shrinkage(k: int, tokens: int) -> float:
    """How far to pull a Hessian from ``tokens`` calibration tokens toward its diagonal, ``K / (K
    + tokens)``: with few tokens per input channel the off-diagonal terms are mostly sampling
    noise, and GPTQ fitted to them raises the error on other text (on SmolLM2 with 1428 tokens,
    a K=1536 down_proj's output error on held-out text doubled unshrunk, and fell below plain
    rounding's shrunk). The diagonal (what the plain search weights by) is kept as it is."""
    return k / (k + max(0, tokens))


def inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float64), with dead
    channels (``H_kk == 0``: never active in calibration) given a unit diagonal."""
    h = h.detach().to(torch.float64).clone()
    k = h.shape[0]
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    for attempt in range(6):
        try:
            hd = h + (damp * mean * (10.0 ** attempt)) * torch.eye(k, dtype=h.dtype)
            lower = torch.linalg.cholesky(hd)
            lower_inv = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=h.dtype), upper=False)
            return torch.linalg.cholesky(lower_inv.T @ lower_inv, upper=True)  # (cholesky_inverse: 30x slower here)
        except RuntimeError:  # not positive definite at this damping: dampen more
            continue
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even when heavily dampened")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, bits: int, group_size: int,
                  scale_dtype: torch.dtype = torch.float16, damp: float = DAMP, shrink: float = 0.0,
                  block: int = BLOCK):
    """Symmetric codes and scales of ``w [N, K]`` by GPTQ with the Hessian ``h [K, K]`` (``X^T X``
    over calibration inputs; any positive multiple), first shrunk toward its diagonal by the
    fraction ``shrink`` (see :func:`shrinkage`). Returns ``(packed codes, scales, None)``
    like :func:`ir.quant.quantize_weight`."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"row length {k} is not a multiple of group_size {group_size}")
    if h.shape != (k, k):
        raise ValueError(f"GPTQ: Hessian of shape {tuple(h.shape)} for a weight with {k} input channels")
    block = max(group_size, block - block % group_size)
    lo, hi = code_range(bits, True)
    if shrink:
        h = h.to(torch.float64)
        h = (1.0 - shrink) * h + shrink * torch.diag(torch.diagonal(h))
    u = inverse_cholesky(h, damp).to(torch.float32)
    diag = torch.diagonal(h).detach().to(torch.float32).clamp(min=0)
    imp = diag / diag.mean().clamp(min=1e-30)
    W = w.detach().to(torch.float32).clone()
    W[:, torch.diagonal(h) <= 0] = 0.0  # dead channels: their inputs are zero, so are their weights' effects
    codes = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(n, k // group_size, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops on a busy machine
    try:
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            wb = W[:, b0:b1].clone()
            err = torch.zeros_like(wb)
            ub = u[b0:b1, b0:b1]
            scale = None
            for i in range(b1 - b0):
                col = b0 + i
                if col % group_size == 0:
                    grp = wb[:, i:i + group_size].reshape(n, 1, group_size)
                    _, s = _symmetric_search(grp, bits, imp[col:col + group_size].reshape(1, group_size), scale_dtype)
                    scale = s.reshape(n)
                    scales[:, col // group_size] = scale
                x = wb[:, i]
                safe = torch.where(scale == 0, torch.ones_like(scale), scale)
                q = torch.round(x / safe).clamp_(lo, hi)
                codes[:, col] = q.to(torch.int32)
                e = (x - q * scale) / ub[i, i]
                wb[:, i:] -= e.unsqueeze(1) * ub[i, i:].unsqueeze(0)
                err[:, i] = e
            W[:, b1:] -= err @ u[b0:b1, b1:]
    finally:
        torch.set_num_threads(threads)
    return pack_codes(codes, bits, signed=True), scales.to(scale_dtype), None
