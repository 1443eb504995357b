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


# keyword arguments transformers passes to attention functions that change nothing here:
# positions travel separately, the mask is causal by construction, nothing is trained
_IGNORED_KWARGS = {"position_ids", "cache_position", "output_attentions", "use_cache", "past_key_values",
                   "past_key_value", "dropout", "training", "layer_idx", "is_causal", "head_mask",
                   "query_length", "target_dtype", "attention_type", "layer_type", "output_router_logits",
                   "output_hidden_states", "return_dict", "logits_to_keep"}


class AttentionArgumentError(ValueError):
    """The model asks its attention function for something llmc's attention op does not do."""


class _TraceState:
    calls = 0
    layers: set = set()


def attention_calls() -> int:
    """How many attention calls the current (or last) trace made."""
    return _TraceState.calls


def _attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    if kwargs.get("is_causal") is False:
        raise AttentionArgumentError(f"{type(module).__name__} asks for non-causal attention (is_causal=False); "
                                     f"llmc's attention op is causal")
    unknown = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS and k not in ("sliding_window", "softcap")
               and v is not None}
    if unknown:
        raise AttentionArgumentError(
            f"{type(module).__name__} passes {', '.join(sorted(unknown))} to its attention function; llmc's "
            f"attention op has no such argument (it takes q, k, v, scale, sliding window and softcap), so the "
            f"model is refused rather than computed without it")
    if attention_mask is not None:
        raise AttentionArgumentError(
            f"{type(module).__name__} builds its own attention mask instead of transformers' mask interface; "
            f"llmc's attention op applies the causal (and window) mask itself and cannot take an arbitrary mask")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    window = kwargs.get("sliding_window") or 0
    softcap = kwargs.get("softcap") or 0.0
    layer = getattr(module, "layer_idx", None)
    if layer is None:  # modules without an index: the order of the calls is the layer order
        layer = _TraceState.calls
    _TraceState.calls += 1
    if int(layer) in _TraceState.layers:
        raise AttentionArgumentError(
            f"{type(module).__name__} with layer_idx {layer} attends a second time in one forward (a shared "
            f"attention layer); llmc keeps one KV cache per layer index")
    _TraceState.layers.add(int(layer))
    out = torch.ops.llmc.attention(query, key, value, int(layer), scale, int(window), float(softcap))
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
    """Make ``model`` (and its sub-configs) use llmc attention and llmc experts inside the block."""
    from . import experts

    register()
    experts.register()
    _TraceState.calls, _TraceState.layers = 0, set()
    text = model.config.get_text_config()
    configs = [model.config] + ([text] if text is not model.config else [])
    saved = [(c._attn_implementation, getattr(c, "_experts_implementation", None)) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_IMPLEMENTATION
            c._experts_implementation = experts.EXPERTS_IMPLEMENTATION
        yield model
    finally:
        for c, (attn, exp) in zip(configs, saved):
            c._attn_implementation = attn
            c._experts_implementation = exp
