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
             gated: bool) -> torch.Tensor:
    """x [T, D], ids/weights [T, K], up [E, U, D], down [E, D, I] -> [T, D] (see the IR's moe op)."""
    from ..ir.interpreter import moe_reference

    return moe_reference(x, ids, weights.to(x.dtype), up, down, up_bias, down_bias, activation, gated)


@llmc_moe.register_fake
def _moe_fake(x, ids, weights, up, down, up_bias, down_bias, activation, gated):
    return torch.empty_like(x)


class ExpertsError(ValueError):
    """An experts module llmc's moe op cannot express."""


_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu",
                "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "FastGELUActivation": "gelu_tanh", "ReLU": "relu", "ReLUActivation": "relu"}


def _activation(module) -> str:
    act = getattr(module, "act_fn", None)
    name = type(act).__name__
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
    if getattr(type(module), "_apply_gate", hf_moe._default_apply_gate) is not hf_moe._default_apply_gate:
        raise ExpertsError(f"{name} applies its own gating function (_apply_gate); llmc's moe op computes "
                           f"act(gate) * up only")
    if getattr(module, "has_post_expert_norm", False):
        raise ExpertsError(f"{name} normalizes each expert's output (post-expert norm); llmc's moe op has no such step")
    gated = bool(getattr(module, "has_gate", True))
    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    up_bias = down_bias = None
    if getattr(module, "has_bias", False):
        up_bias = module.gate_up_proj_bias if gated else module.up_proj_bias
        down_bias = module.down_proj_bias
    if getattr(module, "is_transposed", False):  # stored [E, D, U] / [E, I, D]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    if gated and not getattr(module, "is_concatenated", True):  # rows interleaved gate0, up0, gate1, ...
        e, u, d = up.shape
        up = up.reshape(e, u // 2, 2, d).transpose(1, 2).reshape(e, u, d)
        if up_bias is not None:
            up_bias = up_bias.reshape(e, u // 2, 2).transpose(1, 2).reshape(e, u)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    out = torch.ops.llmc.moe(x, top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1), up,
                             down, up_bias, down_bias, _activation(module), gated)
    return out.reshape(shape)


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts_forward)
    _registered = True
