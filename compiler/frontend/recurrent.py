"""The recurrent-state boundary: short convolutions and delta-rule scans traced as one op each.

transformers' hybrid models (LFM2, Qwen3-Next / Qwen3.5, OLMo-hybrid, Kimi-Linear, ...) call
module-level kernel functions for their recurrent parts, with torch fallbacks:
``causal_conv1d_fn`` (a depthwise causal convolution) and ``torch_chunk_gated_delta_rule`` /
``chunk_kimi_delta_attention`` (a chunked scan whose padding to the chunk size pins the token
count in a trace). While tracing, those names point at the functions below, which call
``torch.ops.llmc.causal_conv1d`` / ``torch.ops.llmc.gated_delta_rule``: the IR's state ops
(``ir/recurrent.py``), which carry each sequence's state across steps the way ``attention``
carries its KV cache. Each call gets its own state index, in call order.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch

from .aten_import import ImportError_, rule


@torch.library.custom_op("llmc::causal_conv1d", mutates_args=())
def llmc_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], state: int) -> torch.Tensor:
    """x [T, C], weight [C, K] -> [T, C], from a zero state (the IR op's meaning at position 0)."""
    from ..ir.recurrent import conv_run

    return conv_run(x.new_zeros((weight.shape[1] - 1, x.shape[1])), x, weight, bias)[0]


@llmc_causal_conv1d.register_fake
def _conv_fake(x, weight, bias, state):
    return torch.empty_like(x)


@torch.library.custom_op("llmc::gated_delta_rule", mutates_args=())
def llmc_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: int) -> torch.Tensor:
    """q, k [T, H, dk], v [T, H, dv], g [T, H(, dk)], beta [T, H] -> [T, H, dv], from a zero state."""
    from ..ir.recurrent import delta_rule_run

    zero = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)
    return delta_rule_run(zero, q, k, v, g, beta)[0]


@llmc_gated_delta_rule.register_fake
def _rule_fake(q, k, v, g, beta, state):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.custom_op("llmc::gated_linear_attention", mutates_args=())
def llmc_gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                beta: torch.Tensor, state: int) -> torch.Tensor:
    """gated_delta_rule with delta = false: S <- S exp(g) + k (beta v), o = q S; from a zero state."""
    from ..ir.recurrent import delta_rule_run

    zero = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)
    return delta_rule_run(zero, q, k, v, g, beta, delta=False)[0]


@llmc_gated_linear_attention.register_fake
def _linear_fake(q, k, v, g, beta, state):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


class RecurrentError(ValueError):
    """A recurrent kernel call llmc's state ops cannot express."""


class _State:
    calls = 0


def _next_state() -> int:
    index = _State.calls
    _State.calls += 1
    return index


def _conv_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """causal_conv1d_fn: hidden_states [1, C, T], weight [C, K] -> [1, C, T]."""
    from transformers.activations import ACT2FN

    if hidden_states.dim() != 3 or hidden_states.shape[0] != 1 or weight.dim() != 2:
        raise RecurrentError(f"causal_conv1d_fn called with {list(hidden_states.shape)} / weight "
                             f"{list(weight.shape)}; llmc expects one sequence [1, C, T] and a depthwise [C, K] weight")
    x = hidden_states[0].transpose(0, 1).to(weight.dtype)
    y = torch.ops.llmc.causal_conv1d(x, weight, bias, _next_state())
    if activation is not None:
        y = ACT2FN[activation](y)
    return y.transpose(0, 1)[None].to(hidden_states.dtype)


def _delta_rule_fn(l2norm):
    """A chunked or recurrent (gated / Kimi) delta-rule function of one modeling module, with
    that module's own l2norm (the variants differ in rounding)."""

    def fn(query, key, value, g, beta, *args, initial_state=None, output_final_state=False,
           use_qk_l2norm_in_kernel=False, **kwargs):
        if initial_state is not None:
            raise RecurrentError("a delta-rule call with an initial state: llmc keeps the state itself")
        dtype = query.dtype
        q, k, v, g, beta = (t.to(torch.float32) for t in (query, key, value, g, beta))
        if q.shape[0] != 1:
            raise RecurrentError(f"delta rule over a batch of {q.shape[0]}; llmc traces one sequence")
        if use_qk_l2norm_in_kernel:
            if l2norm is None:
                raise RecurrentError("the delta rule asks for l2-normalized q/k but its module has no l2norm")
            q, k = l2norm(q, dim=-1, eps=1e-6), l2norm(k, dim=-1, eps=1e-6)
        hk, hv = k.shape[2], v.shape[2]
        if hk != hv:
            q, k = q.repeat_interleave(hv // hk, dim=2), k.repeat_interleave(hv // hk, dim=2)
        q = q * (1.0 / (q.shape[-1] ** 0.5))
        out = torch.ops.llmc.gated_delta_rule(q[0], k[0], v[0], g[0], beta[0], _next_state())
        return out[None].to(dtype), None

    return fn


def _selective_scan_fn(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **kwargs):
    """Mamba's selective scan (u, dt [1, D, T], A [D, N], B, C [1, N, T]) as gated linear
    attention with one head per channel: key dt_t B_t, value u_t, query C_t, gate A dt_t."""
    import torch.nn.functional as F

    if hidden_states.shape[0] != 1:
        raise RecurrentError(f"selective scan over a batch of {hidden_states.shape[0]}; llmc traces one sequence")
    if return_last_state:
        raise RecurrentError("a selective scan that returns its last state: llmc keeps the state itself")
    dtype = hidden_states.dtype
    u = hidden_states[0].transpose(0, 1).float()                 # [T, D]
    dt = dt[0].transpose(0, 1).float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()
    if delta_softplus:
        dt = F.softplus(dt)
    b, c = B[0].transpose(0, 1).float(), C[0].transpose(0, 1).float()   # [T, N]
    heads = u.shape[1]
    q = c[:, None, :].expand(-1, heads, -1)
    k = dt[:, :, None] * b[:, None, :]
    g = A.float()[None] * dt[:, :, None]
    y = torch.ops.llmc.gated_linear_attention(q, k, u[:, :, None], g, torch.ones_like(u), _next_state())[..., 0]
    if D is not None:
        y = y + u * D.float()
    y = y.transpose(0, 1)[None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


def _ssd_chunk_scan_fn(hidden_states, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None,
                       initial_states=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                       return_final_states=False, **kwargs):
    """Mamba-2's chunked SSD scan (x [1, T, H, P], dt [1, T, H], A [H], B, C [1, T, G, N]) as
    gated linear attention per head: key B_t, value dt_t x_t, query C_t, scalar gate A dt_t."""
    import torch.nn.functional as F

    if hidden_states.shape[0] != 1:
        raise RecurrentError(f"SSD scan over a batch of {hidden_states.shape[0]}; llmc traces one sequence")
    if initial_states is not None or return_final_states:
        raise RecurrentError("an SSD scan with an initial or final state: llmc keeps the state itself")
    if z is not None:
        raise RecurrentError("an SSD scan with a z gate inside the kernel is not supported")
    x = hidden_states[0].float()                                 # [T, H, P]
    dt = dt[0].float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = torch.clamp(dt, min=lo, max=hi)
    heads = x.shape[1]
    b, c = B[0].float(), C[0].float()
    if b.shape[1] != heads:
        b = b.repeat_interleave(heads // b.shape[1], dim=1)
        c = c.repeat_interleave(heads // c.shape[1], dim=1)
    g = A.float()[None] * dt                                     # [T, H]
    y = torch.ops.llmc.gated_linear_attention(c, b, x * dt[:, :, None], g, torch.ones_like(dt), _next_state())
    if D is not None:
        y = y + x * (D.float()[:, None] if D.dim() == 1 else D.float())
    return y[None].to(hidden_states.dtype)


def _lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """MiniMax's lightning attention (block-wise linear attention with a per-head decay
    exp(-slope)) in its recurrent form: S <- exp(-slope) S + k v^T, o = q S, as gated linear
    attention with a constant scalar gate, then the module's own norm, output gate and
    projection."""
    batch, tokens, _ = hidden_states.shape
    if batch != 1:
        raise RecurrentError(f"lightning attention over a batch of {batch}; llmc traces one sequence")
    heads, dim = self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states)).reshape(batch, tokens, heads, 3 * dim)
    q, k, v = torch.split(qkv, dim, dim=3)
    gate = (-self.slope_rate.reshape(1, heads).float()).expand(tokens, heads)
    out = torch.ops.llmc.gated_linear_attention(q[0].float(), k[0].float(), v[0].float(), gate,
                                                torch.ones_like(gate), _next_state())
    out = self.norm(out.reshape(batch, tokens, heads * dim).to(hidden_states.dtype))
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    return self.out_proj(out), None


def _griffin_block_forward(self, input_states, position_ids=None, attention_mask=None, use_cache=True, **kwargs):
    """Griffin's recurrent block (RecurrentGemma): its short convolution through the state op,
    then the module's own RG-LRU gates, whose diagonal recurrence h <- a h + x runs as gated
    linear attention with one head per channel (see _rg_lru_scan)."""
    if input_states.shape[0] != 1:
        raise RecurrentError(f"a recurrent block over a batch of {input_states.shape[0]}; llmc traces one sequence")
    y = self.act_fn(self.linear_y(input_states))
    x = self.linear_x(input_states)
    w = self.conv_1d.weight
    x = torch.ops.llmc.causal_conv1d(x[0].to(w.dtype), w[:, 0, :], self.conv_1d.bias, _next_state())
    x = self.rg_lru(x[None].to(input_states.dtype), position_ids)
    return self.linear_out(x * y), None


def _rg_lru_scan(self, hidden_states, recurrent_gate, reset, recurrent_states=None, acc_dtype=torch.float32):
    """RG-LRU's linear scan h_t = a_t h_{t-1} + x_t for one sequence. The reset at position 0
    needs nothing: the state op starts every sequence from zeros there."""
    x = hidden_states[0].to(acc_dtype)                     # [T, W]
    g = torch.log(recurrent_gate[0].to(acc_dtype))[:, :, None]
    one = torch.ones_like(g)
    out = torch.ops.llmc.gated_linear_attention(one, one, x[:, :, None], g, torch.ones_like(x), _next_state())
    return out[:, :, 0][None].to(hidden_states.dtype), None


def _is_griffin(module) -> bool:
    return all(hasattr(module, a) for a in ("linear_x", "linear_y", "linear_out", "conv_1d", "rg_lru")) and \
        hasattr(module.rg_lru, "_rnn_scan")


def _is_lightning(module) -> bool:
    return type(module).__name__.endswith("LightningAttention") and all(
        hasattr(module, a) for a in ("slope_rate", "qkv_proj", "output_gate", "out_proj", "norm", "act_fn"))


_SCAN_NAMES = {"mamba_selective_scan": _selective_scan_fn, "mamba2_chunk_scan": _ssd_chunk_scan_fn}
_CONV_NAMES = ("causal_conv1d_fn",)
_RULE_NAMES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "chunk_gated_delta_rule",
               "chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")


@contextlib.contextmanager
def recurrent_enabled(model):
    """Point the recurrent kernel functions of ``model``'s modeling modules at llmc's state ops."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    saved, swapped, rnn = [], [], []
    _State.calls = 0
    try:
        for mod in modules:
            if mod is None:
                continue
            for name in _CONV_NAMES + _RULE_NAMES + tuple(_SCAN_NAMES):
                if name in vars(mod):
                    saved.append((mod, name, vars(mod)[name]))
                    if name in _SCAN_NAMES:
                        new = _SCAN_NAMES[name]
                    else:
                        new = _conv_fn if name in _CONV_NAMES else _delta_rule_fn(vars(mod).get("l2norm"))
                    setattr(mod, name, new)
        for m in model.modules():  # module-level swaps (recurrent forms of block-wise scans)
            if _is_lightning(m):
                m.forward = _lightning_forward.__get__(m)
                swapped.append(m)
            elif _is_griffin(m):
                m.forward = _griffin_block_forward.__get__(m)
                m.rg_lru._rnn_scan = _rg_lru_scan.__get__(m.rg_lru)
                swapped.append(m)
                rnn.append(m.rg_lru)
        yield model
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)
        for m in swapped:
            del m.forward
        for m in rnn:
            del m._rnn_scan


def recurrent_module_names(mod) -> list[str]:
    """The recurrent kernel functions a modeling module defines (that tracing replaces)."""
    if mod is None:
        return []
    return [n for n in _CONV_NAMES + _RULE_NAMES + tuple(_SCAN_NAMES) if n in vars(mod)]


def state_calls() -> int:
    return _State.calls


@rule("llmc.causal_conv1d.default")
def _import_conv(imp, node):
    x, w, bias, state = imp.value(list(node.args[:4]))
    if bias is not None and not hasattr(bias, "type"):
        raise ImportError_(f"causal_conv1d at %{node.name}: the bias is not a tensor")
    extra = [] if bias is None else [imp.as_tensor(bias, x.type.dtype)]
    return imp.b.op("causal_conv1d", x, w, imp.positions, *extra, hint=f"conv{state}", state=int(state))


@rule("llmc.gated_delta_rule.default")
def _import_rule(imp, node):
    q, k, v, g, beta, state = imp.value(list(node.args[:6]))
    return imp.b.op("gated_delta_rule", q, k, v, g, beta, imp.positions, hint=f"delta{state}", state=int(state))


@rule("llmc.gated_linear_attention.default")
def _import_linear(imp, node):
    q, k, v, g, beta, state = imp.value(list(node.args[:6]))
    return imp.b.op("gated_delta_rule", q, k, v, g, beta, imp.positions, hint=f"scan{state}", state=int(state),
                    delta=False)
