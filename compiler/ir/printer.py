"""Text form of the IR. ``parse(print_module(m))`` rebuilds ``m`` and prints identically.

    module @name attributes {k = v} {
      param @w : f32[64, 32] {origin = "parameter"}
      func @forward(%x: f32[T, 32]) -> (f32[T, 64]) {
        %w0 = param() {name = "w"} : f32[64, 32]
        %y = linear(%x, %w0) : f32[T, 64]
        return %y
      }
    }
"""

from __future__ import annotations

import json
import math
from typing import Any

import sympy

from .core import Block, Function, Module, Op


def format_attr_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr_value(x) for x in v) + "]"
    if isinstance(v, sympy.Basic):
        return str(v)
    raise TypeError(f"attribute value of type {type(v).__name__} cannot be printed: {v!r}")


def format_attrs(attrs: dict[str, Any]) -> str:
    if not attrs:
        return ""
    return "{" + ", ".join(f"{k} = {format_attr_value(v)}" for k, v in attrs.items()) + "}"


def format_op(op: Op, indent: str = "") -> list[str]:
    lhs = ", ".join(f"%{r.name}" for r in op.results)
    operands = ", ".join(f"%{v.name}" for v in op.operands)
    attrs = format_attrs(op.attrs)
    types = ", ".join(str(r.type) for r in op.results)
    line = f"{indent}{lhs} = {op.kind}({operands})"
    if attrs:
        line += f" {attrs}"
    line += f" : {types}"
    if op.region is None:
        return [line]
    lines = [line + " {"]
    lines += format_block(op.region, indent + "  ", "yield", region_header=True)
    lines.append(indent + "}")
    return lines


def format_block(block: Block, indent: str, terminator: str, region_header: bool = False) -> list[str]:
    lines = []
    if region_header:
        args = ", ".join(f"%{a.name}: {a.type}" for a in block.args)
        lines.append(f"{indent}^({args}):")
    for op in block.ops:
        lines += format_op(op, indent)
    lines.append(f"{indent}{terminator} " + ", ".join(f"%{v.name}" for v in block.results))
    return lines


def format_function(fn: Function, indent: str = "") -> list[str]:
    args = ", ".join(f"%{a.name}: {a.type}" for a in fn.args)
    rets = ", ".join(str(v.type) for v in fn.results)
    lines = [f"{indent}func @{fn.name}({args}) -> ({rets}) {{"]
    lines += format_block(fn.body, indent + "  ", "return")
    lines.append(indent + "}")
    return lines


def print_module(module: Module) -> str:
    head = f"module @{module.name}"
    if module.attrs:
        head += f" attributes {format_attrs(module.attrs)}"
    lines = [head + " {"]
    for p in module.params.values():
        lines.append(f"  param @{p.name} : {p.type} {{origin = {json.dumps(p.origin)}}}")
    for fn in module.functions.values():
        lines += format_function(fn, "  ")
    lines.append("}")
    return "\n".join(lines) + "\n"
