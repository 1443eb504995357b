"""The mixture-of-experts boundary: an experts function transformers calls, traced as one op.

transformers (5.x) dispatches the expert FFNs of MoE layers through its ``ExpertsInterface``
(``config._experts_implementation``). Ours calls ``torch.ops.llmc.moe``, so ``torch.export``
keeps one node per MoE layer carrying the tokens, the router's choice (expert ids and
weights, computed by the model's own router code, which traces as ordinary ops) and the
expert weights, instead of the data-dependent gather/scatter loops of the eager experts. The
importer turns it into the IR's ``moe`` op. Experts this op cannot express (a custom gate,
a post-expert norm, an unknown activation) are refused by name.
"""

from __future__ import annotations

from typing import Optional

import torch

EXPERTS_IMPLEMENTATION = "llmc"


@torch.library.custom_op("llmc::moe", mutates_args=())
def llmc_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             up_bias: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], activation: str,
             gated: bool, alpha: float, limit: float, up_offset: float) -> torch.Tensor:
    """x [T, D], ids/weights [T, K], up [E, U, D], down [E, D, I] -> [T, D] (see the IR's moe op)."""
    from ..ir.interpreter import moe_reference

    return moe_reference(x, ids, weights.to(x.dtype), up, down, up_bias, down_bias, activation, gated, alpha,
                         limit, up_offset)


@llmc_moe.register_fake
def _moe_fake(x, ids, weights, up, down, up_bias, down_bias, activation, gated, alpha, limit, up_offset):
    return torch.empty_like(x)


def _first_attr(module, names):
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def recognize_gate(module, activation: Optional[str]) -> tuple[bool, dict]:
    """Which form of the moe op's gate the module's ``_apply_gate`` computes, found by
    evaluating it on a probe: (interleaved rows?, moe attributes). Candidates: act(g) * u over
    the concatenated or interleaved halves, optionally with GPT-OSS's clamps (the module's
    ``limit``), an up offset of 1 and g * sigmoid(alpha g) (the module's ``alpha``)."""
    from ..ir.interpreter import moe_gate

    inner = 8
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(16, 2 * inner, generator=g) * 6
    with torch.no_grad():
        want = module._apply_gate(probe.clone()).float()
    limit = _first_attr(module, ("limit", "swiglu_limit"))
    alpha = _first_attr(module, ("alpha", "swiglu_alpha"))
    acts = ([activation] if activation else []) + (["swish_alpha"] if alpha is not None else [])
    for interleaved in (False, True):
        h = probe.reshape(16, inner, 2).transpose(1, 2).reshape(16, 2 * inner) if interleaved else probe
        for act in acts:
            for lim in ([0.0] + ([limit] if limit else [])):
                for offset in (0.0, 1.0):
                    got = moe_gate(h, act, True, alpha, lim, offset)
                    if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                        attrs = {"activation": act, "alpha": alpha or 0.0, "limit": lim, "up_offset": offset}
                        return interleaved, attrs
    raise ExpertsError(f"{type(module).__name__} applies its own gating function (_apply_gate) that matches none "
                       f"of the moe op's forms (act(g) * u, with optional clamps to its limit, an up offset of 1, "
                       f"or g * sigmoid(alpha g); halves concatenated or interleaved)")


class ExpertsError(ValueError):
    """An experts module llmc's moe op cannot express."""


_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu",
                "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "FastGELUActivation": "gelu_tanh", "ReLU": "relu", "ReLUActivation": "relu"}


_FUNCTIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}  # plain torch functions (F.silu, ...)


def _activation(module) -> str:
    act = getattr(module, "act_fn", None)
    name = type(act).__name__
    if name in ("function", "builtin_function_or_method") and getattr(act, "__name__", "") in _FUNCTIONS:
        return _FUNCTIONS[act.__name__]
    if name == "GELUActivation" and getattr(act, "act", None) is not None and \
            getattr(act.act, "__name__", "") == "gelu_tanh":
        return "gelu_tanh"
    if name not in _ACTIVATIONS:
        raise ExpertsError(f"{type(module).__name__} uses the activation {name}; llmc's moe op supports "
                           f"{', '.join(sorted(set(_ACTIVATIONS.values())))}")
    return _ACTIVATIONS[name]


def _experts_forward(module, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations import moe as hf_moe

    name = type(module).__name__
    gated = bool(getattr(module, "has_gate", True))
    try:
        activation = _activation(module)
    except ExpertsError:
        activation = None
    interleaved, gate_attrs = False, {"activation": activation, "alpha": 0.0, "limit": 0.0, "up_offset": 0.0}
    if gated and getattr(type(module), "_apply_gate", hf_moe._default_apply_gate) is not hf_moe._default_apply_gate:
        found = getattr(module, "_llmc_gate", None)  # probed by prepare(), before the trace
        if found is None:
            raise ExpertsError(f"{name}: its gate was not probed before tracing (call experts.prepare(model))")
        if isinstance(found, ExpertsError):
            raise found
        interleaved, gate_attrs = found
    elif activation is None:
        _activation(module)  # raises, naming the activation
    if getattr(module, "has_post_expert_norm", False):
        raise ExpertsError(f"{name} normalizes each expert's output (post-expert norm); llmc's moe op has no such step")
    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    up_bias = down_bias = None
    if getattr(module, "has_bias", False):
        up_bias = module.gate_up_proj_bias if gated else module.up_proj_bias
        down_bias = module.down_proj_bias
    if getattr(module, "is_transposed", False):  # stored [E, D, U] / [E, I, D]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    if gated and interleaved:  # rows interleaved gate0, up0, gate1, ...
        e, u, d = up.shape
        up = up.reshape(e, u // 2, 2, d).transpose(1, 2).reshape(e, u, d)
        if up_bias is not None:
            up_bias = up_bias.reshape(e, u // 2, 2).transpose(1, 2).reshape(e, u)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    out = torch.ops.llmc.moe(x, top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1), up,
                             down, up_bias, down_bias, gate_attrs["activation"], gated, gate_attrs["alpha"],
                             gate_attrs["limit"], gate_attrs["up_offset"])
    return out.reshape(shape)


def prepare(model) -> None:
    """Probe every experts module's custom gate now, with real tensors (inside the trace every
    tensor is fake); the experts function reads the result."""
    from transformers.integrations import moe as hf_moe

    for module in model.modules():
        custom = getattr(type(module), "_apply_gate", hf_moe._default_apply_gate)
        if custom is hf_moe._default_apply_gate or not getattr(module, "has_gate", False):
            continue
        try:
            activation = _activation(module)
        except ExpertsError:
            activation = None
        try:
            module._llmc_gate = recognize_gate(module, activation)
        except ExpertsError as exc:
            module._llmc_gate = exc


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts_forward)
    _registered = True
