"""Quantize weights: ``linear`` (and, where asked, ``embedding``) → ``quantized_linear``.

Unlike the other passes this one owns weights too: it replaces each float weight that a
``param`` op feeds into a linear by the codes/scales[/mins] params of llmc's quantized
layout (``ir/quant.py``) and writes those tensors into the weights dict it was given.

Where the quantized weights come from is a ``provider``: for a scheme (``q4_g32``, ...)
per-group quantization of the float weight (symmetric scales
from a least-squares search, optionally weighted by calibration statistics, or GPTQ from
calibration Hessians); for a quantized GGUF source
the file's own blocks, repacked (``--quant gguf``). A weight the provider declines stays
float (a K not divisible by the group size, a weight the GGUF stores in float).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ir import Module, Op, TensorType, Value
from ..ir.builder import infer_types
from ..ir.quant import QuantWeight, codes_cols, codes_dtype, quantize_weight
from .base import Pass

Provider = Callable[[str, torch.Tensor], Optional[QuantWeight]]


@dataclass(frozen=True)
class Scheme:
    """A round-to-nearest scheme: ``q{bits}[a]_g{group}`` (``a``: asymmetric, with mins)."""

    bits: int
    group_size: int
    symmetric: bool

    @property
    def name(self) -> str:
        return f"q{self.bits}{'' if self.symmetric else 'a'}_g{self.group_size}"

    def quantize(self, name: str, w: torch.Tensor, importance: Optional[torch.Tensor] = None,
                 hessian: Optional[torch.Tensor] = None, tokens: int = 0) -> Optional[QuantWeight]:
        """``importance``: mean x^2 per input channel (weights the scale search); ``hessian``:
        mean x x^T of the input over ``tokens`` calibration tokens (a symmetric scheme then
        quantizes by GPTQ, ``compiler/gptq.py``)."""
        if w.dim() != 2 or not w.is_floating_point() or w.shape[1] % self.group_size:
            return None
        k = w.shape[1]
        if importance is not None and importance.numel() != k:
            importance = None  # statistics of another shape (a table read as a linear): unweighted
        if hessian is not None and self.symmetric and hessian.shape == (k, k):
            from ..gptq import gptq_quantize, shrinkage

            codes, scales, mins = gptq_quantize(w, hessian, bits=self.bits, group_size=self.group_size,
                                                shrink=shrinkage(k, tokens))
            return QuantWeight(codes, scales, mins, self.bits, self.group_size, True, source=self.name)
        codes, scales, mins = quantize_weight(w, bits=self.bits, group_size=self.group_size,
                                              symmetric=self.symmetric, importance=importance)
        return QuantWeight(codes, scales, mins, self.bits, self.group_size, self.symmetric, source=self.name)

    def provider(self, importance: Optional[dict] = None, hessians: Optional[dict] = None,
                 tokens: int = 0) -> Provider:
        """The provider of this scheme; ``importance`` (weight name -> mean x^2 per input
        channel, from ``compiler/calibration.py``) weights the symmetric scale search;
        ``hessians`` (weight name -> mean x x^T over ``tokens`` tokens) makes it GPTQ."""
        if not importance and not hessians:
            return self.quantize
        importance, hessians = importance or {}, hessians or {}
        return lambda name, w: self.quantize(name, w, importance.get(name), hessians.get(name), tokens)


SCHEMES = {s.name: s for s in (Scheme(b, g, sym) for b in (4, 8) for sym in (True, False) for g in (32, 64, 128))}
SPECIAL = {"none": "keep float weights", "gguf": "keep a quantized GGUF's own blocks (repacked, exact)"}


def scheme_help() -> str:
    lines = [f"  {n:10s} {SPECIAL[n]}" for n in SPECIAL]
    for s in SCHEMES.values():
        kind = "symmetric" if s.symmetric else "asymmetric (scale + min)"
        lines.append(f"  {s.name:10s} int{s.bits}, groups of {s.group_size}, {kind}, fp16 scales")
    return "\n".join(lines)


def parse_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        m = re.fullmatch(r"q(\d+)(a?)_g(\d+)", name)
        hint = ""
        if m:
            hint = " (bits must be 4 or 8 and the group 32, 64 or 128)"
        raise ValueError(f"unknown quantization scheme {name!r}{hint}; choose one of "
                         f"{', '.join(list(SPECIAL) + list(SCHEMES))} (llmc compile --quant list)")
    return SCHEMES[name]


class Quantize(Pass):
    """Replace float weights of linears (optionally embeddings) by quantized ones.

    Requires: nothing. Guarantees: every linear whose weight the provider quantized is a
    quantized_linear (a bias becomes an add); float weights nobody reads any more are gone
    from the parameter table and the weights dict."""

    name = "quantize"
    guarantees = ("weights-quantized",)

    def __init__(self, weights: dict, provider: Provider, embedding: bool = False, lm_head: bool = True,
                 lm_head_provider: Optional[Provider] = None):
        self.weights, self.provider = weights, provider
        self.embedding, self.lm_head = embedding, lm_head
        self.lm_head_provider = lm_head_provider  # e.g. 8 bits for the LM head of a 4-bit scheme
        self.done: dict[str, Optional[QuantWeight]] = {}
        self._head: set = set()

    def _quant(self, name: str) -> Optional[QuantWeight]:
        if name not in self.done:
            w = self.weights.get(name)
            provider = self.lm_head_provider if (name in self._head and self.lm_head_provider) else self.provider
            self.done[name] = None if w is None else provider(name, w)
        return self.done[name]

    def _params(self, module: Module, name: str, qw: QuantWeight, param_ops: dict, block_ops: list) -> list[Value]:
        """The param values of ``name``'s quantized tensors (created once per function)."""
        key = (id(block_ops), name)
        if key in param_ops:
            return param_ops[key]
        n, k = qw.shape
        parts = [("codes", qw.codes, TensorType((n, codes_cols(k, qw.bits)), codes_dtype(qw.bits, qw.signed)))]
        sdt = "f16" if qw.scales.dtype == torch.float16 else "f32"
        parts.append(("scales", qw.scales, TensorType((n, k // qw.group_size), sdt)))
        if qw.mins is not None:
            parts.append(("mins", qw.mins, TensorType((n, k // qw.group_size), sdt)))
        values = []
        for suffix, tensor, ty in parts:
            pname = f"{name}.{suffix}"
            if pname not in module.params:
                module.add_param(pname, ty, origin=f"quantized:{name}:{qw.source}")
                self.weights[pname] = tensor
            op = Op("param", [], {"name": pname}, [Value(self._names.take(pname), ty)])
            block_ops.append(op)
            values.append(op.result)
        param_ops[key] = values
        return values

    def run(self, module: Module) -> Module:
        from ..ir.builder import NameAllocator

        self._head = self._lm_head_params(module)
        lm_head = self._head if not self.lm_head else set()
        for fn in module.functions.values():
            block = fn.body
            self._names = NameAllocator()
            self._names.reserve_block(block)
            new_ops: list[Op] = []
            param_ops: dict = {}
            replaced: dict[Value, Value] = {}
            for op in block.ops:
                op.operands = [replaced.get(v, v) for v in op.operands]
                target = self._target(op, lm_head)
                if target is None:
                    new_ops.append(op)
                    continue
                wname, qw = target
                qparams = self._params(module, wname, qw, param_ops, new_ops)
                attrs = {"bits": qw.bits, "group_size": qw.group_size, "signed": qw.signed}
                if qw.codebook is not None:
                    attrs["codebook"] = list(qw.codebook)
                if op.kind == "linear":
                    operands = [op.operands[0]] + qparams
                    kind = "quantized_linear"
                else:
                    operands = [op.operands[1]] + qparams
                    kind = "quantized_embedding"
                q = Op(kind, operands, attrs, [])
                (ty,) = infer_types(q, module)
                out = Value(self._names.take(op.result.name + "_q"), ty)
                q.results = [out]
                out.producer = q
                new_ops.append(q)
                if op.kind == "linear" and len(op.operands) == 3:
                    add = Op("add", [out, op.operands[2]], {}, [])
                    out = Value(self._names.take(op.result.name + "_b"), infer_types(add, module)[0])
                    add.results = [out]
                    out.producer = add
                    new_ops.append(add)
                if op.kind == "embedding" and ty.dtype != op.result.type.dtype:
                    cast = Op("cast", [out], {"dtype": op.result.type.dtype}, [])
                    out = Value(self._names.take(op.result.name + "_c"), infer_types(cast, module)[0])
                    cast.results = [out]
                    out.producer = cast
                    new_ops.append(cast)
                replaced[op.result] = out
            block.results = [replaced.get(v, v) for v in block.results]
            block.ops = _drop_unused_params(new_ops, block.results)
        self._drop_unused_weights(module)
        return module

    def _target(self, op: Op, lm_head: set) -> Optional[tuple[str, QuantWeight]]:
        if op.kind == "linear":
            w = op.operands[1]
        elif op.kind == "embedding" and self.embedding:
            w = op.operands[0]
        else:
            return None
        if w.producer is None or w.producer.kind != "param" or w.type.dtype not in ("f32", "f16", "bf16"):
            return None
        name = w.producer.attrs["name"]
        if op.kind == "linear" and name in lm_head:
            return None
        qw = self._quant(name)
        return None if qw is None else (name, qw)

    @staticmethod
    def _lm_head_params(module: Module) -> set:
        """Weights of the linears that produce a function's results (the logits)."""
        out = set()
        for fn in module.functions.values():
            last = None
            for op in fn.body.ops:
                w = op.operands[1] if op.kind == "linear" else None
                if w is not None and w.producer is not None and w.producer.kind == "param":
                    last = w.producer.attrs["name"]
            if last is not None:
                out.add(last)
        return out

    def _drop_unused_weights(self, module: Module) -> None:
        used = set()
        for fn in module.functions.values():
            for op in fn.body.walk():
                if op.kind == "param":
                    used.add(op.attrs["name"])
        for name in list(module.params):
            if name not in used and name in self.done and self.done[name] is not None:
                del module.params[name]
                self.weights.pop(name, None)


def _drop_unused_params(ops: list[Op], results: list[Value]) -> list[Op]:
    used = {id(v) for op in ops for v in op.operands} | {id(v) for v in results}
    return [op for op in ops if op.kind != "param" or id(op.result) in used]
