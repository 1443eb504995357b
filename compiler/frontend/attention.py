"""The KV-cache boundary: an attention function transformers calls, traced as one custom op.

transformers lets a program register its own attention implementation and mask builder.
Ours calls ``torch.ops.llmc.attention``, so ``torch.export`` keeps one opaque node per layer
carrying q, k, v (after RoPE), the layer index, scale, sliding window, softcap, sinks and
chunk size, and no mask arithmetic at all. The importer turns that node into the IR's ``attention`` op.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

ATTN_IMPLEMENTATION = "llmc"


@torch.library.custom_op("llmc::attention", mutates_args=())
def llmc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                   window: int, softcap: float, sinks: Optional[torch.Tensor] = None,
                   chunk: int = 0, alibi: Optional[list[float]] = None) -> torch.Tensor:
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
    if alibi:  # ALiBi: slope_h * (key position - query position)
        scores = scores + torch.tensor(alibi).reshape(1, -1, 1, 1) * (i[None, :] - i[:, None]).float()
    allowed = i[None, :] <= i[:, None]
    if window > 0:
        allowed &= (i[:, None] - i[None, :]) < window
    if chunk > 0:
        allowed &= (i[:, None] // chunk) == (i[None, :] // chunk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one extra logit per head in each softmax's denominator
        sink = sinks.float().reshape(1, -1, 1, 1).expand(b, hq, t, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return out.transpose(1, 2).contiguous()


@llmc_attention.register_fake
def _attention_fake(q, k, v, layer, scale, window, softcap, sinks=None, chunk=0, alibi=None):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


# keyword arguments transformers passes to attention functions that change nothing here:
# positions travel separately, the mask is causal by construction, nothing is trained
_IGNORED_KWARGS = {"position_ids", "cache_position", "output_attentions", "use_cache", "past_key_values",
                   "past_key_value", "dropout", "training", "layer_idx", "is_causal", "head_mask",
                   "query_length", "target_dtype", "attention_type", "layer_type", "output_router_logits",
                   "output_hidden_states", "return_dict", "logits_to_keep"}


class AttentionArgumentError(ValueError):
    """The model asks its attention function for something llmc's attention op does not do."""


class MaskSpec:
    """What the mask builder hands the model instead of a mask tensor when the mask is not
    plain causal: the model passes it through to its attention function, which turns it into
    attention op attributes. A sliding window here is the one the model's mask applies; it
    wins over the ``sliding_window`` argument (which some models set only for flash kernels,
    and others not at all while their mask has one)."""

    def __init__(self, chunk: int = 0, window: int = 0):
        self.chunk, self.window = chunk, window


class _TraceState:
    calls = 0


def attention_calls() -> int:
    """How many attention calls the current (or last) trace made."""
    return _TraceState.calls


def _attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    if kwargs.get("is_causal") is False:
        raise AttentionArgumentError(f"{type(module).__name__} asks for non-causal attention (is_causal=False); "
                                     f"llmc's attention op is causal")
    unknown = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS
               and k not in ("sliding_window", "softcap", "s_aux", "sinks") and v is not None}
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.dim() != 1
                              or sinks.shape[0] != query.shape[1]):
        raise AttentionArgumentError(f"{type(module).__name__} passes attention sinks that are not one logit per "
                                     f"query head ([{query.shape[1]}]); llmc's attention op takes sinks of that form")
    if unknown:
        raise AttentionArgumentError(
            f"{type(module).__name__} passes {', '.join(sorted(unknown))} to its attention function; llmc's "
            f"attention op has no such argument (it takes q, k, v, scale, sliding window and softcap), so the "
            f"model is refused rather than computed without it")
    chunk, mask_window = 0, 0
    if isinstance(attention_mask, MaskSpec):
        chunk, mask_window, attention_mask = attention_mask.chunk, attention_mask.window, None
    if attention_mask is not None:
        raise AttentionArgumentError(
            f"{type(module).__name__} builds its own attention mask instead of transformers' mask interface; "
            f"llmc's attention op applies the causal (and window) mask itself and cannot take an arbitrary mask")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    window = mask_window or kwargs.get("sliding_window") or 0
    softcap = kwargs.get("softcap") or 0.0
    # Each call gets the cache of its own index, in call order: for ordinary models that is
    # layer_idx; a layer that attends twice (differential attention) or an attention module
    # shared by several layers gets one cache per call, which is what each call attends over.
    layer = _TraceState.calls
    _TraceState.calls += 1
    out = torch.ops.llmc.attention(query, key, value, int(layer), scale, int(window), float(softcap),
                                   None if sinks is None else sinks.to(query.dtype), int(chunk))
    return out, None


# mask pieces transformers composes that llmc's attention op reproduces by itself
_CAUSAL_PARTS = {"causal_mask_function", "padding_mask_function", "and_masks", "or_masks",
                 "remap_positions_for_packed_sequence", "add_offsets_to_mask_function",
                 "packed_sequence_mask_function"}  # packing is read from positions: one sequence per step row range here


def _mask_parts(fn, seen=None) -> list[tuple[str, object]]:
    """The named functions a transformers mask function is composed of (through closures),
    with the sliding window where one is set."""
    seen = seen if seen is not None else set()
    if not callable(fn) or id(fn) in seen:
        return []
    seen.add(id(fn))
    qual = getattr(fn, "__qualname__", type(fn).__name__)
    outer = qual.split(".<locals>")[0]
    parts = [(outer, None)]
    cells = dict(zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()), getattr(fn, "__closure__", None) or ()))
    if outer == "sliding_window_overlay" and "sliding_window" in cells:
        parts = [(outer, cells["sliding_window"].cell_contents)]
    if outer == "chunked_overlay" and "chunk_size" in cells:
        parts = [(outer, cells["chunk_size"].cell_contents)]
    for cell in cells.values():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if callable(v) and not isinstance(v, torch.Tensor):
                parts += _mask_parts(v, seen)
    return parts


# Multimodal blocks (images attending to themselves bidirectionally): transformers ORs this
# overlay onto the causal mask and it unmasks only tokens whose block id is >= 0, which come from
# token-type inputs (image tokens). llmc's step takes text token ids only, for which every block
# id is -1, so the overlay adds nothing and the mask is the causal one.
_TEXT_ONLY_NOOPS = {"blockwise_overlay", "maybe_pad_block_sequence_ids"}


def _no_mask(*args, **kwargs):
    """The mask builder: no mask tensor (the attention op masks by itself) or a ``MaskSpec``
    (chunked attention), after checking that the mask asked for is one the op reproduces:
    causal, optionally within a sliding window or a chunk. Anything else (bidirectional, a
    model's own mask function) is refused by name rather than dropped."""
    chunk = window = 0
    for name, value in _mask_parts(kwargs.get("mask_function")):
        # models build one mask per layer type; each layer's attention call gets its own
        if name == "chunked_overlay" and isinstance(value, int) and value > 0:
            chunk = value
        elif name == "sliding_window_overlay" and isinstance(value, int) and value > 0:
            window = value
        elif name != "sliding_window_overlay" and name not in _CAUSAL_PARTS and name not in _TEXT_ONLY_NOOPS:
            raise AttentionArgumentError(f"the model asks for a {name.replace('_', ' ')} attention mask; llmc's "
                                         f"attention op is causal, optionally within a sliding window or a chunk, "
                                         f"and has no such mask")
    return MaskSpec(chunk, window) if chunk or window else None



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
def llmc_attention_enabled(model, attention: str = ATTN_IMPLEMENTATION):
    """Make ``model`` (and its sub-configs) use llmc attention (or the ``attention``
    implementation named) and llmc experts inside the block."""
    from . import experts
    from .recurrent import recurrent_enabled

    register()
    experts.register()
    experts.prepare(model)
    _TraceState.calls = 0
    text = model.config.get_text_config()
    configs = [model.config] + ([text] if text is not model.config else [])
    saved = [(c._attn_implementation, getattr(c, "_experts_implementation", None)) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = attention
            c._experts_implementation = experts.EXPERTS_IMPLEMENTATION
        with recurrent_enabled(model):  # recurrent kernels -> llmc state ops (frontend/recurrent.py)
            yield model
    finally:
        for c, (attn, exp) in zip(configs, saved):
            c._attn_implementation = attn
            c._experts_implementation = exp
