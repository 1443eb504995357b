"""The KV-cache boundary: an attention function transformers calls, traced as one custom op.

transformers lets a program register its own attention implementation and mask builder.
Ours calls ``torch.ops.llmc.attention``, so ``torch.export`` keeps one opaque node per layer
carrying q, k, v (after RoPE), the layer index, scale, sliding window and softcap, and no mask
arithmetic at all. The importer turns that node into the IR's ``attention`` op.
"""

from __future__ import annotations

import contextlib
import math

import torch

ATTN_IMPLEMENTATION = "llmc"


@torch.library.custom_op("llmc::attention", mutates_args=())
def llmc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                   window: int, softcap: float) -> torch.Tensor:
    """Causal attention without a cache, [B, Hq, T, D] x [B, Hkv, T, D] -> [B, T, Hq, Dv].

    Eager meaning for a trace of one prompt from position 0; the IR's ``attention`` op
    generalises it to a cache indexed by position."""
    b, hq, t, _ = q.shape
    group = hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(t)
    allowed = i[None, :] <= i[:, None]
    if window > 0:
        allowed &= (i[:, None] - i[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out.transpose(1, 2).contiguous()


@llmc_attention.register_fake
def _attention_fake(q, k, v, layer, scale, window, softcap):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def _attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    window = kwargs.get("sliding_window") or 0
    softcap = kwargs.get("softcap") or 0.0
    out = torch.ops.llmc.attention(query, key, value, int(module.layer_idx), scale, int(window),
                                   float(softcap))
    return out, None


def _no_mask(*args, **kwargs):
    return None


_registered = False


def register() -> None:
    """Register the llmc attention and (absent) mask with transformers, once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_interface)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    _registered = True


@contextlib.contextmanager
def llmc_attention_enabled(model):
    """Make ``model`` (and its sub-configs) use llmc attention inside the block."""
    register()
    configs = [model.config] + [c for c in (getattr(model.config, "text_config", None),) if c is not None]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_IMPLEMENTATION
        yield model
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s
