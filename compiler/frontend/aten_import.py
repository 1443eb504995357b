"""Import a ``torch.export`` ExportedProgram (aten graph) into an llmc IR Module.

One rule per aten op kind, in ``RULES``. A rule gets the importer and the fx node, and returns
the IR value (or list of values) that stands for the node's result. Result shapes come from
the node's fake-tensor metadata, so view/reshape/expand need no ``-1`` inference of our own.
Only nodes that reach the output are imported (the trace keeps some dead bookkeeping).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from ..ir import Builder, Function, Module, TensorType, Value, symbol
from ..ir.interpreter import IR_DTYPES, TORCH_DTYPES as IR_TORCH
from ..ir.types import Dim, normalize_dim

INT64_MAX = 2**63 - 1


class UnsupportedOpError(NotImplementedError):
    """An aten op without an importer rule; the message names the op, node and source line."""

    def __init__(self, target: str, node_name: str, source: str):
        self.target, self.node_name, self.source = target, node_name, source
        supported = ", ".join(sorted(RULE_NAMES()))
        super().__init__(
            f"unsupported op '{target}' at node %{node_name}"
            f"{(' (from ' + source + ')') if source else ''}.\n"
            f"llmc's frontend imports these ops: {supported}.\n"
            f"Fix: add an import rule for '{target}' in llmc/compiler/frontend/aten_import.py "
            f"(RULES), or change the model code so it does not use it."
        )


class ImportError_(ValueError):
    """A node llmc cannot import for a reason other than a missing rule."""


def source_location(node: torch.fx.Node) -> str:
    """'file.py:123 in fn: code' for the innermost model frame of the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f"{path}:{line} in {fn}: `{code.strip()}`"


def node_target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


@dataclass
class Importer:
    program: Any  # torch.export.ExportedProgram
    module: Module
    input_names: dict[str, str]  # fx placeholder name of a user input -> IR arg name
    symbol_names: dict[str, str] = field(default_factory=dict)  # torch symbol -> IR symbol
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.b = Builder(self.module)
        self.env: dict[torch.fx.Node, Any] = {}
        sig = self.program.graph_signature
        self.placeholder_targets: dict[str, tuple[str, str]] = {}
        for spec in sig.input_specs:
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                origin = {"PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant"}[kind]
                self.placeholder_targets[spec.arg.name] = (spec.target, origin)

    # ------------------------------------------------------------------ types and dims

    def dim(self, d) -> Dim:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            return normalize_dim(expr.xreplace({s: self.ir_symbol(s) for s in expr.free_symbols}))
        if isinstance(d, sympy.Basic):
            return normalize_dim(d.xreplace({s: self.ir_symbol(s) for s in d.free_symbols}))
        return int(d)

    def ir_symbol(self, s: sympy.Symbol) -> sympy.Symbol:
        name = self.symbol_names.get(s.name)
        if name is None:
            raise ImportError_(f"the trace has a dynamic dim {s.name} that is not the token count; "
                               f"llmc supports one dynamic dim (T)")
        return symbol(name)

    def type_of(self, node: torch.fx.Node) -> TensorType:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ImportError_(f"node %{node.name} has no tensor metadata")
        return TensorType(tuple(self.dim(d) for d in val.shape), IR_DTYPES[val.dtype])

    # ------------------------------------------------------------------ values

    def value(self, arg) -> Any:
        """The IR value, dim or Python constant an fx argument stands for."""
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return [self.value(a) for a in arg]
        return arg

    def const(self, value, dtype: str) -> Value:
        return self.b.op("constant", value=float(value) if dtype in ("f64", "f32", "f16", "bf16") else int(value),
                         dtype=dtype)

    def as_tensor(self, x, dtype: str) -> Value:
        """A tensor operand of the given dtype: scalars become constants, others are cast."""
        if isinstance(x, Value):
            return x if x.type.dtype == dtype else self.b.op("cast", x, dtype=dtype)
        if isinstance(x, (int, float, bool)):
            return self.const(x, dtype)
        raise ImportError_(f"cannot use {x!r} as a tensor operand")

    def param(self, placeholder: str) -> Value:
        target, origin = self.placeholder_targets[placeholder]
        if target in self.program.state_dict:
            tensor = self.program.state_dict[target]
        else:
            tensor = self.program.constants[target]
        tensor = tensor.detach()
        if target not in self.module.params:
            self.module.add_param(target, TensorType(tuple(tensor.shape), IR_DTYPES[tensor.dtype]), origin)
            self.weights[target] = tensor.contiguous()
        return self.b.op("param", hint=re.sub(r"\W", "_", target), name=target)

    # ------------------------------------------------------------------ driving

    def live_nodes(self) -> set[torch.fx.Node]:
        graph = self.program.graph
        out = graph.output_node()
        live, stack = set(), [out]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
        return live

    def run(self) -> list[Value]:
        live = self.live_nodes()
        for node in self.program.graph.nodes:
            if node not in live:
                continue
            if node.op == "placeholder":
                if node.name in self.placeholder_targets:
                    self.env[node] = self.param(node.name)
                elif node.name in self.input_names:
                    self.env[node] = self.input_names[node.name]  # resolved by the caller
                else:
                    self.env[node] = node.meta.get("val")
            elif node.op == "call_function":
                name = node_target_name(node)
                rule = RULES.get(name)
                if _touches_complex(self, node) and name not in META_RULES:
                    rule = COMPLEX_RULES.get(name)
                    if rule is None:
                        raise ImportError_(f"complex numbers reach {name} at %{node.name} "
                                           f"({source_location(node) or 'the model'}); llmc imports complex tensors "
                                           f"only through {', '.join(sorted(COMPLEX_RULES))}")
                if rule is None:
                    raise UnsupportedOpError(name, node.name, source_location(node))
                first_new_op = len(self.b.block.ops)
                try:
                    self.env[node] = rule(self, node)
                    self._name_after_node(self.env[node], node, first_new_op)
                except (UnsupportedOpError, ImportError_):
                    raise
                except TypeError as exc:
                    raise ImportError_(f"importing %{node.name} ({name}) from "
                                       f"{source_location(node) or 'the model'}: {exc}") from exc
            elif node.op == "output":
                outs = node.args[0]
                return [self.env[o] for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
        raise ImportError_("graph has no output")

    def _name_after_node(self, result, node: torch.fx.Node, first_new_op: int) -> None:
        """Give the value a node produced the fx node's name, so IR and trace read alike."""
        if isinstance(result, Value) and result.producer in self.b.block.ops[first_new_op:] \
                and result.name.isdigit():
            result.name = self.b.names.take(node.name)

    def args(self, node: torch.fx.Node, *names_defaults):
        """Positional-or-keyword arguments of an aten call, with defaults."""
        out = []
        for i, (name, default) in enumerate(names_defaults):
            if i < len(node.args):
                out.append(self.value(node.args[i]))
            elif name in node.kwargs:
                out.append(self.value(node.kwargs[name]))
            else:
                out.append(default)
        return out


# ---------------------------------------------------------------------- rules

Rule = Callable[[Importer, torch.fx.Node], Any]
RULES: dict[str, Rule] = {}


def RULE_NAMES():
    return RULES.keys()


def rule(*targets: str):
    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def _out_dtype(imp: Importer, node) -> str:
    return imp.type_of(node).dtype


_UNARY = {"neg": "neg", "rsqrt": "rsqrt", "cos": "cos", "sin": "sin", "silu": "silu", "tanh": "tanh",
          "exp": "exp", "sqrt": "sqrt", "sigmoid": "sigmoid", "relu": "relu", "abs": "abs",
          "reciprocal": "reciprocal", "log": "log", "log1p": "log1p", "floor": "floor", "erf": "erf", "expm1": "expm1"}
for _aten, _ir in _UNARY.items():
    rule(f"aten.{_aten}.default")(
        (lambda k: lambda imp, node: imp.b.op(k, imp.as_tensor(imp.value(node.args[0]), _out_dtype(imp, node))))(_ir)
    )


@rule("aten.gelu.default")
def _gelu(imp, node):
    x, approximate = imp.args(node, ("self", None), ("approximate", "none"))
    return imp.b.op("gelu", x, approximate=approximate)


def _binary(kind: str, reverse: bool = False):
    def fn(imp: Importer, node):
        a, b = imp.value(node.args[0]), imp.value(node.args[1])
        dtype = _out_dtype(imp, node)
        alpha = node.kwargs.get("alpha", 1)
        if reverse:
            a, b = b, a
        a, b = imp.as_tensor(a, dtype), imp.as_tensor(b, dtype)
        if alpha != 1:
            b = imp.b.op("mul", b, imp.const(alpha, dtype))
        return imp.b.op(kind, a, b)

    return fn


for _aten, _ir in {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow",
                   "maximum": "maximum", "minimum": "minimum", "multiply": "mul", "subtract": "sub",
                   "divide": "div"}.items():
    for _ov in ("Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor", "default"):
        rule(f"aten.{_aten}.{_ov}")(_binary(_ir))
rule("aten.rsub.Scalar", "aten.rsub.Tensor")(_binary("sub", reverse=True))
rule("aten.min.other")(_binary("minimum"))
rule("aten.max.other")(_binary("maximum"))


@rule("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default")
def _reduce(imp, node):
    x, axes, keepdim = imp.args(node, ("self", None), ("dim", None), ("keepdim", False))
    kind = {"mean": "mean", "sum": "sum", "amax": "max"}[node.target._schema.name.split("::")[1]]
    if axes is None or axes == []:
        axes = list(range(x.type.rank))
    if isinstance(axes, int):
        axes = [axes]
    out = imp.b.op(kind, x, axes=list(axes), keepdim=bool(keepdim))
    want = _out_dtype(imp, node)
    return out if out.type.dtype == want else imp.b.op("cast", out, dtype=want)


@rule("aten._softmax.default", "aten.softmax.int")
def _softmax(imp, node):
    x, axis = imp.value(node.args[0]), imp.value(node.args[1])
    return imp.as_tensor(imp.b.op("softmax", x, axis=axis), _out_dtype(imp, node))


@rule("aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten._to_copy.default",
      "aten.type_as.default")
def _cast(imp, node):
    return imp.as_tensor(imp.value(node.args[0]), _out_dtype(imp, node))


@rule("aten.alias.default", "aten.clone.default", "aten.contiguous.default", "aten.detach.default",
      "aten.lift_fresh_copy.default", "aten.dropout.default")
def _identity(imp, node):
    training = node.target == torch.ops.aten.dropout.default and len(node.args) > 2 and node.args[2]
    if training:
        raise ImportError_(f"dropout in training mode at %{node.name}: export the model in eval() mode")
    return imp.value(node.args[0])


META_RULES = ("aten._assert_tensor_metadata.default", "aten.sym_size.int", "aten.sym_constrain_range_for_size.default",
              "aten._assert_scalar.default")


@rule(*META_RULES)
def _meta_only(imp, node):
    val = node.meta.get("val")
    return imp.dim(val) if isinstance(val, (torch.SymInt, int)) else None


@rule("aten.embedding.default")
def _embedding(imp, node):
    table, ids = imp.value(node.args[0]), imp.value(node.args[1])
    return imp.b.op("embedding", table, ids)


@rule("aten.linear.default")
def _linear(imp, node):
    x, w, bias = imp.args(node, ("input", None), ("weight", None), ("bias", None))
    return imp.b.op("linear", *([x, w] + ([bias] if bias is not None else [])))


@rule("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def _matmul(imp, node):
    return imp.b.op("matmul", imp.value(node.args[0]), imp.value(node.args[1]))


@rule("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.unsqueeze.default",
      "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.flatten.using_ints")
def _reshape(imp, node):
    x = imp.value(node.args[0])
    shape = list(imp.type_of(node).shape)
    return imp.b.op("reshape", x, shape=shape)


@rule("aten.transpose.int")
def _transpose(imp, node):
    x, a, b = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    perm = list(range(x.type.rank))
    a, b = a % x.type.rank, b % x.type.rank
    perm[a], perm[b] = perm[b], perm[a]
    return imp.b.op("permute", x, perm=perm)


@rule("aten.permute.default")
def _permute(imp, node):
    x, dims = imp.value(node.args[0]), imp.value(node.args[1])
    return imp.b.op("permute", x, perm=[d % x.type.rank for d in dims])


@rule("aten.t.default")
def _t(imp, node):
    x = imp.value(node.args[0])
    return imp.b.op("permute", x, perm=[1, 0]) if x.type.rank == 2 else x


@rule("aten.expand.default", "aten.expand_as.default")
def _expand(imp, node):
    return imp.b.op("expand", imp.value(node.args[0]), shape=list(imp.type_of(node).shape))


def _clamp_index(i, size: Dim, default) -> Dim:
    if i is None:
        return default
    if isinstance(i, int):
        if i >= INT64_MAX // 2:
            return size
        if i < 0:
            i = normalize_dim(size + i)
        if isinstance(size, int) and isinstance(i, int):
            return max(0, min(i, size))
        return i
    if getattr(normalize_dim(i), "is_negative", False):  # -T etc.: counts from the end, as ints do
        return normalize_dim(size + i)
    return normalize_dim(i)


@rule("aten.slice.Tensor")
def _slice(imp, node):
    x, axis, start, end, step = imp.args(node, ("self", None), ("dim", 0), ("start", None),
                                         ("end", None), ("step", 1))
    axis %= x.type.rank
    size = x.type.shape[axis]
    start, end = _clamp_index(start, size, 0), _clamp_index(end, size, size)
    if start == 0 and step == 1 and (end == size or imp.type_of(node).shape[axis] == size):
        return x
    return imp.b.op("slice", x, axis=axis, start=start, end=end, step=step)


@rule("aten.select.int")
def _select(imp, node):
    x, axis, index = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    axis %= x.type.rank
    index = _clamp_index(index, x.type.shape[axis], 0)
    s = imp.b.op("slice", x, axis=axis, start=index, end=normalize_dim(index + 1), step=1)
    return imp.b.op("reshape", s, shape=list(imp.type_of(node).shape))


@rule("aten.cat.default", "aten.concat.default", "aten.concatenate.default")
def _cat(imp, node):
    xs, axis = imp.value(node.args[0]), imp.value(node.args[1]) if len(node.args) > 1 else 0
    xs = [x for x in xs if not (x.type.rank == 1 and x.type.shape[0] == 0)]
    return imp.b.op("concat", *xs, axis=axis % xs[0].type.rank)


@rule("aten.chunk.default", "aten.split.Tensor", "aten.split_with_sizes.default")
def _split(imp, node):
    x = imp.value(node.args[0])
    axis = imp.value(node.args[2]) if len(node.args) > 2 else node.kwargs.get("dim", 0)
    axis %= x.type.rank
    outs, start = [], 0
    for part in node.meta["val"]:
        n = imp.dim(part.shape[axis])
        end = normalize_dim(start + n)
        outs.append(imp.b.op("slice", x, axis=axis, start=start, end=end, step=1))
        start = end
    return outs


@rule("mul", "add", "sub", "floordiv", "truediv", "mod", "neg", "sym_max", "sym_min", "sym_sum")
def _sym_arith(imp, node):
    """Python arithmetic on symbolic sizes: the result's own dim (an expression in T)."""
    val = node.meta.get("val")
    if not isinstance(val, (torch.SymInt, int)):
        raise ImportError_(f"{node_target_name(node)} at %{node.name} computes a non-integer size")
    return imp.dim(val)


@rule("getitem")
def _getitem(imp, node):
    return imp.value(node.args[0])[node.args[1]]


@rule("llmc.attention.default")
def _attention(imp, node):
    q, k, v, layer, scale, window, softcap = imp.value(list(node.args[:7]))
    sinks = imp.value(node.args[7]) if len(node.args) > 7 else imp.value(node.kwargs.get("sinks"))
    chunk = int(node.args[8]) if len(node.args) > 8 else int(node.kwargs.get("chunk", 0))
    alibi = node.args[9] if len(node.args) > 9 else node.kwargs.get("alibi")
    positions = imp.positions
    tok = [positions.type.shape[0]]

    def flat(x: Value) -> Value:  # [1, H, T, D] -> [T, H, D]
        if x.type.rank != 4 or x.type.shape[0] != 1:
            raise ImportError_(f"llmc.attention at %{node.name} expects [1, heads, T, dim] inputs, got {x.type}")
        t = imp.b.op("permute", x, perm=[0, 2, 1, 3])
        return imp.b.op("reshape", t, shape=tok + list(x.type.shape[1:2]) + list(x.type.shape[3:]))

    extra = [] if sinks is None else [imp.as_tensor(sinks, q.type.dtype)]
    out = imp.b.op("attention", flat(q), flat(k), flat(v), positions, *extra, hint=f"attn{layer}",
                   layer=int(layer), scale=float(scale), window=int(window), softcap=float(softcap),
                   **({"chunk": chunk} if chunk else {}),
                   **({"alibi": [float(x) for x in alibi]} if alibi else {}))
    return imp.b.op("reshape", out, shape=list(imp.type_of(node).shape))


def _compare(kind: str):
    def fn(imp: Importer, node):
        a, b = imp.value(node.args[0]), imp.value(node.args[1])
        tensor = a if isinstance(a, Value) else b
        if not isinstance(tensor, Value):
            raise ImportError_(f"comparison of two scalars at %{node.name}")
        dtype = tensor.type.dtype
        if isinstance(a, Value) and isinstance(b, Value) and a.type.dtype != b.type.dtype:
            dtype = _promote(a.type.dtype, b.type.dtype)
        return imp.b.op(kind, imp.as_tensor(a, dtype), imp.as_tensor(b, dtype))

    return fn


def _promote(a: str, b: str) -> str:
    order = ["bool", "u8", "i8", "i16", "i32", "i64", "bf16", "f16", "f32", "f64"]
    return max(a, b, key=order.index)


for _aten in ("gt", "ge", "lt", "le", "eq", "ne"):
    rule(f"aten.{_aten}.Scalar", f"aten.{_aten}.Tensor")(_compare(_aten))


def _logical(kind: str):
    def fn(imp: Importer, node):
        xs = [imp.as_tensor(imp.value(a), "bool") for a in node.args[:2 if kind != "logical_not" else 1]]
        if any(x.type.dtype != "bool" for x in xs) or imp.type_of(node).dtype != "bool":
            raise ImportError_(f"{node.target} at %{node.name}: only bool operands are supported")
        return imp.b.op(kind, *xs)

    return fn


rule("aten.logical_and.default", "aten.bitwise_and.Tensor", "aten.__and__.Tensor")(_logical("logical_and"))
rule("aten.logical_or.default", "aten.bitwise_or.Tensor", "aten.__or__.Tensor")(_logical("logical_or"))
rule("aten.logical_not.default", "aten.bitwise_not.default")(_logical("logical_not"))


@rule("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def _where(imp, node):
    cond, a, b = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    dtype = _out_dtype(imp, node)
    return imp.b.op("where", imp.as_tensor(cond, "bool"), imp.as_tensor(a, dtype), imp.as_tensor(b, dtype))


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(imp, node):
    x, mask, value = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    dtype = _out_dtype(imp, node)
    return imp.b.op("where", imp.as_tensor(mask, "bool"), imp.as_tensor(value, dtype), imp.as_tensor(x, dtype))


@rule("aten.index_put.default")
def _index_put(imp, node):
    """x[mask] = v with one bool mask of x's shape (the only form a static graph can express)."""
    x, indices, values, accumulate = imp.args(node, ("self", None), ("indices", None), ("values", None),
                                              ("accumulate", False))
    given = [i for i in indices if i is not None]
    if accumulate or len(given) != 1 or given[0].type.dtype != "bool" or given[0].type.rank != x.type.rank:
        raise ImportError_(f"index_put at %{node.name} ({source_location(node) or 'the model'}): llmc imports "
                           f"x[mask] = v with one bool mask of x's shape only")
    if isinstance(values, Value) and values.type.rank and not all(
            isinstance(d, int) and d == 1 for d in values.type.shape):
        raise ImportError_(f"index_put at %{node.name}: values must be one value broadcast to the masked places")
    return imp.b.op("where", given[0], imp.as_tensor(values, x.type.dtype), x)


@rule("aten.gather.default")
def _gather_op(imp, node):
    x, axis, idx = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    return imp.b.op("gather", x, idx, axis=axis % x.type.rank)


@rule("aten.scatter.value", "aten.scatter.src")
def _scatter_op(imp, node):
    x, axis, idx, src = (imp.value(a) for a in node.args[:4])
    if len(node.args) > 4 or node.kwargs.get("reduce"):
        raise ImportError_(f"scatter with a reduce mode at %{node.name} is not supported")
    dtype = x.type.dtype
    if not isinstance(src, Value):
        src = imp.b.op("expand", imp.const(src, dtype), shape=list(idx.type.shape))
    return imp.b.op("scatter", x, idx, imp.as_tensor(src, dtype), axis=axis % x.type.rank)


def _strided_slice_scatter(imp, node, x, src, axis, start, end, step):
    """x[start:end:step] = src along a static axis (interleaved M-RoPE sections): runs of x's
    untouched entries and single rows of src, concatenated in order."""
    size = x.type.shape[axis]
    if not all(isinstance(d, int) for d in (size, start, end, step)) or step < 1:
        raise ImportError_(f"slice_scatter with step {step} at %{node.name} needs static bounds, got "
                           f"{start}:{end} of {size}")
    touched = list(range(start, min(end, size), step))
    parts, prev = [], 0
    for k, j in enumerate(touched):
        if j > prev:
            parts.append(imp.b.op("slice", x, axis=axis, start=prev, end=j, step=1))
        parts.append(imp.b.op("slice", src, axis=axis, start=k, end=k + 1, step=1))
        prev = j + 1
    if prev < size:
        parts.append(imp.b.op("slice", x, axis=axis, start=prev, end=size, step=1))
    return parts[0] if len(parts) == 1 else imp.b.op("concat", *parts, axis=axis)


@rule("aten.select_scatter.default")
def _select_scatter(imp, node):
    """x with x.select(dim, index) replaced by src: src as a one-row slice, scattered."""
    x, src, axis, index = imp.args(node, ("self", None), ("src", None), ("dim", 0), ("index", 0))
    axis %= x.type.rank
    index = _clamp_index(index, x.type.shape[axis], 0)
    shape = list(x.type.shape)
    shape[axis] = 1
    row = imp.b.op("reshape", imp.as_tensor(src, x.type.dtype), shape=shape)
    return _strided_slice_scatter(imp, node, x, row, axis, index, index + 1, 1)


@rule("aten.slice_scatter.default")
def _slice_scatter(imp, node):
    """x with x[start:end] along dim replaced by src: the untouched parts concatenated around src."""
    x, src, axis, start, end, step = imp.args(node, ("self", None), ("src", None), ("dim", 0), ("start", None),
                                              ("end", None), ("step", 1))
    axis %= x.type.rank
    size = x.type.shape[axis]
    start, end = _clamp_index(start, size, 0), _clamp_index(end, size, size)
    if step != 1:
        return _strided_slice_scatter(imp, node, x, imp.as_tensor(src, x.type.dtype), axis, start, end, step)
    parts = []
    if start != 0:
        parts.append(imp.b.op("slice", x, axis=axis, start=0, end=start, step=1))
    parts.append(src)
    if not dims_equal_(end, size):
        parts.append(imp.b.op("slice", x, axis=axis, start=end, end=size, step=1))
    return parts[0] if len(parts) == 1 else imp.b.op("concat", *parts, axis=axis)


def dims_equal_(a, b) -> bool:
    from ..ir.types import dims_equal

    return dims_equal(a, b)


@rule("aten.conv1d.default", "aten.convolution.default", "aten._conv_depthwise2d.default")
def _conv(imp, node):
    raise ImportError_(
        f"{node_target_name(node)} at %{node.name} ({source_location(node) or 'the model'}): a convolution over "
        f"the token axis (a short causal convolution, as in LFM2/Mamba-style blocks) needs the previous tokens' "
        f"inputs as recurrent state at every decode step; llmc's step carries a KV cache only, so the model "
        f"is not supported")


@rule("aten.square.default")
def _square(imp, node):
    x = imp.as_tensor(imp.value(node.args[0]), _out_dtype(imp, node))
    return imp.b.op("mul", x, x)


@rule("aten.softplus.default")
def _softplus(imp, node):
    x, beta, threshold = imp.args(node, ("self", None), ("beta", 1), ("threshold", 20))
    if beta == 1:
        return imp.b.op("softplus", x)
    dtype = x.type.dtype
    scaled = imp.b.op("softplus", imp.b.op("mul", x, imp.const(beta, dtype)))
    return imp.b.op("div", scaled, imp.const(beta, dtype))


@rule("aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(imp, node):
    name = node.target._schema.name.split("::")[1]
    x = imp.value(node.args[0])
    lo, hi = imp.args(node, ("self", None), ("min", None), ("max", None))[1:] if name == "clamp" else (
        (imp.value(node.args[1]), None) if name == "clamp_min" else (None, imp.value(node.args[1])))
    dtype = _out_dtype(imp, node)
    x = imp.as_tensor(x, dtype)
    if lo is not None:
        x = imp.b.op("maximum", x, imp.as_tensor(lo, dtype))
    if hi is not None:
        x = imp.b.op("minimum", x, imp.as_tensor(hi, dtype))
    return x


@rule("aten.layer_norm.default")
def _layer_norm(imp, node):
    x, shape, weight, bias, eps = imp.args(node, ("input", None), ("normalized_shape", None), ("weight", None),
                                           ("bias", None), ("eps", 1e-5))
    if len(shape) != 1:
        raise ImportError_(f"layer_norm at %{node.name} normalizes over {len(shape)} dims {list(shape)}; llmc's "
                           f"layer_norm op normalizes over the last dim only")
    operands = [x] + ([weight] if weight is not None else [])
    if weight is not None and bias is not None:
        operands.append(bias)
    out = imp.b.op("layer_norm", *operands, eps=float(eps))
    if weight is None and bias is not None:
        out = imp.b.op("add", out, bias)
    return out


@rule("aten.rms_norm.default")
def _rms_norm(imp, node):
    x, shape, weight, eps = imp.args(node, ("input", None), ("normalized_shape", None), ("weight", None),
                                     ("eps", None))
    if len(shape) != 1:
        raise ImportError_(f"rms_norm at %{node.name} normalizes over {len(shape)} dims; llmc's over the last only")
    eps = float(eps) if eps is not None else float(torch.finfo(IR_TORCH[x.type.dtype]).eps)
    if weight is not None:
        return imp.b.op("rms_norm", x, weight, eps=eps, weight_offset=0.0)
    dtype = x.type.dtype
    ms = imp.b.op("mean", imp.b.op("mul", x, x), axes=[x.type.rank - 1], keepdim=True)
    return imp.b.op("mul", x, imp.b.op("rsqrt", imp.b.op("add", ms, imp.const(eps, dtype))))


@rule("aten.baddbmm.default")
def _baddbmm(imp, node):
    """beta * self + alpha * (batch1 @ batch2) (RecurrentGemma's per-head gates)."""
    bias, a, b, beta, alpha = imp.args(node, ("self", None), ("batch1", None), ("batch2", None), ("beta", 1),
                                       ("alpha", 1))
    return _scaled_matmul_add(imp, node, bias, a, b, beta, alpha)


@rule("aten.addmm.default")
def _addmm(imp, node):
    bias, a, b, beta, alpha = imp.args(node, ("self", None), ("mat1", None), ("mat2", None), ("beta", 1),
                                       ("alpha", 1))
    return _scaled_matmul_add(imp, node, bias, a, b, beta, alpha)


def _scaled_matmul_add(imp, node, bias, a, b, beta, alpha):
    dtype = _out_dtype(imp, node)
    out = imp.b.op("matmul", a, b)
    if alpha != 1:
        out = imp.b.op("mul", out, imp.const(alpha, dtype))
    if beta != 1:
        bias = imp.b.op("mul", bias, imp.const(beta, dtype))
    return imp.b.op("add", out, bias)


@rule("aten.stack.default")
def _stack(imp, node):
    xs, axis = imp.args(node, ("tensors", None), ("dim", 0))
    out = imp.type_of(node)
    axis %= out.rank
    parts = []
    for x in xs:
        shape = list(x.type.shape)
        shape.insert(axis, 1)
        parts.append(imp.b.op("reshape", x, shape=shape))
    return parts[0] if len(parts) == 1 else imp.b.op("concat", *parts, axis=axis)


@rule("aten.repeat_interleave.self_int")
def _repeat_interleave(imp, node):
    x, repeats, axis = imp.args(node, ("self", None), ("repeats", None), ("dim", None))
    if axis is None:
        raise ImportError_(f"repeat_interleave without dim at %{node.name}: only the per-axis form is supported")
    axis %= x.type.rank
    shape = list(x.type.shape)
    wide = shape[:axis + 1] + [1] + shape[axis + 1:]
    expanded = imp.b.op("expand", imp.b.op("reshape", x, shape=wide),
                        shape=shape[:axis + 1] + [repeats] + shape[axis + 1:])
    return imp.b.op("reshape", expanded, shape=list(imp.type_of(node).shape))


@rule("aten.repeat.default")
def _repeat(imp, node):
    x, repeats = imp.value(node.args[0]), imp.value(node.args[1])
    shape = list(x.type.shape)
    shape = [1] * (len(repeats) - len(shape)) + shape
    x = imp.b.op("reshape", x, shape=shape)
    wide, target = [], []
    for r, d in zip(repeats, shape):
        wide += [1, d]
        target += [r, d]
    x = imp.b.op("expand", imp.b.op("reshape", x, shape=wide), shape=target)
    return imp.b.op("reshape", x, shape=list(imp.type_of(node).shape))


def _gather_rows(imp, node, table: Value, axis: int, ids: Value) -> Value:
    """table indexed along ``axis`` by an integer tensor: an embedding of flattened rows."""
    if axis != 0:
        perm = [axis] + [a for a in range(table.type.rank) if a != axis]
        table = imp.b.op("permute", table, perm=perm)
    rest = list(table.type.shape[1:])
    flat = imp.b.op("reshape", table, shape=[table.type.shape[0], normalize_dim(sympy.Mul(*rest)) if rest else 1])
    rows = imp.b.op("embedding", flat, ids)
    out = imp.b.op("reshape", rows, shape=list(ids.type.shape) + rest)
    if axis != 0:
        n = ids.type.rank
        back = list(range(n, n + axis)) + list(range(n)) + list(range(n + axis, out.type.rank))
        out = imp.b.op("permute", out, perm=back)
    return out


def _constant_indices_wrapped(imp, ids: Value, size) -> Value:
    """Constant index tensors (lifted from the model code, e.g. ``x[..., [-2], :]``) may count
    from the end; their negative entries are wrapped once here, at import."""
    producer = ids.producer
    name = producer.attrs.get("name") if producer is not None and producer.kind == "param" else None
    w = imp.weights.get(name) if name is not None else None
    if w is not None and isinstance(size, int) and bool((w < 0).any()):
        imp.weights[name] = torch.where(w < 0, w + size, w).contiguous()
    return ids


@rule("aten.index.Tensor")
def _index(imp, node):
    x, indices = imp.value(node.args[0]), imp.value(node.args[1])
    given = [(a, i) for a, i in enumerate(indices) if i is not None]
    if len(given) != 1 or not isinstance(given[0][1], Value) or given[0][1].type.dtype not in ("i64", "i32"):
        raise ImportError_(f"indexing at %{node.name} ({source_location(node) or 'the model'}) uses "
                           f"{len(given)} index tensors; llmc imports x[ids] with one integer index tensor")
    axis, ids = given[0]
    ids = _constant_indices_wrapped(imp, ids, x.type.shape[axis])
    if axis != 0 and ids.type.rank != 1:
        raise ImportError_(f"indexing at %{node.name}: a multi-dim index on axis {axis} is not supported")
    return _gather_rows(imp, node, x, axis, ids)


@rule("aten.index_select.default")
def _index_select(imp, node):
    x, axis, ids = imp.value(node.args[0]), imp.value(node.args[1]), imp.value(node.args[2])
    return _gather_rows(imp, node, x, axis % x.type.rank, ids)


@rule("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(imp, node):
    """``arange`` over constant bounds (rotary frequencies computed inside the forward): the
    values become a constant weight. Bounds that depend on the token count are refused."""
    bounds = [imp.value(a) for a in node.args]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise ImportError_(f"arange at %{node.name} ({source_location(node) or 'the model'}) runs to a bound that "
                           f"depends on the token count: the model derives positions itself; llmc passes them as "
                           f"an input")
    val = node.meta["val"]
    name = f"_const.{node.name}"
    tensor = torch.arange(*bounds, dtype=val.dtype)
    if name not in imp.module.params:
        imp.module.add_param(name, TensorType(tuple(tensor.shape), IR_DTYPES[tensor.dtype]), "constant")
        imp.weights[name] = tensor
    return imp.b.op("param", hint=re.sub(r"\W", "_", name), name=name)


@rule("aten.zeros.default", "aten.ones.default", "aten.full.default", "aten.new_zeros.default",
      "aten.new_ones.default", "aten.new_full.default", "aten.new_empty.default", "aten.empty.memory_format",
      "aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default", "aten.empty_like.default",
      "aten.scalar_tensor.default")
def _filled(imp, node):
    """A tensor of one value: a constant broadcast to the result shape (empty ones read as 0)."""
    name = node.target._schema.name.split("::")[1]
    out = imp.type_of(node)
    if "ones" in name:
        value = 1
    elif name in ("full", "scalar_tensor"):
        value = imp.value(node.args[1] if name == "full" else node.args[0])
    elif name in ("new_full", "full_like"):
        value = imp.value(node.args[2] if name == "new_full" else node.args[1])
    else:
        value = 0
    if isinstance(value, Value):
        raise ImportError_(f"{name} at %{node.name} takes a tensor fill value")
    c = imp.const(value, out.dtype)
    return c if out.rank == 0 else imp.b.op("expand", c, shape=list(out.shape))


@rule("aten.copy.default")
def _copy(imp, node):
    """Functional copy_: the source's values in the destination's shape and dtype."""
    out = imp.type_of(node)
    src = imp.as_tensor(imp.value(node.args[1]), out.dtype)
    return src if src.type.same_as(out) else imp.b.op("expand", src, shape=list(out.shape))


@rule("aten.topk.default")
def _topk(imp, node):
    x, k, axis, largest, _sorted = imp.args(node, ("self", None), ("k", None), ("dim", -1), ("largest", True),
                                            ("sorted", True))
    if axis % x.type.rank != x.type.rank - 1 or not largest:
        raise ImportError_(f"topk at %{node.name} ({source_location(node) or 'the model'}): llmc's topk takes the "
                           f"largest entries along the last axis (got dim={axis}, largest={largest})")
    return imp.b.op_multi("topk", [x], {"k": int(k)}, hint="topk")


@rule("aten.max.dim")
def _max_dim(imp, node):
    """(values, indices) of the maximum along the last axis: topk with k = 1 (ties toward the
    lower index, as torch)."""
    x = imp.value(node.args[0])
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if axis % x.type.rank != x.type.rank - 1:
        raise ImportError_(f"max over dim {axis} at %{node.name} ({source_location(node) or 'the model'}): llmc "
                           f"takes the maximum with its index along the last axis only")
    values, indices = imp.b.op_multi("topk", [x], {"k": 1}, hint="max")
    if keepdim:
        return [values, indices]
    shape = list(x.type.shape[:-1])
    return [imp.b.op("reshape", values, shape=shape), imp.b.op("reshape", indices, shape=shape)]


@rule("llmc.moe.default")
def _moe(imp, node):
    x, ids, weights, up, down, up_bias, down_bias, activation, gated, alpha, limit, offset = imp.value(list(node.args))
    operands = [x, ids, imp.as_tensor(weights, x.type.dtype), up, down]
    if up_bias is not None:
        operands += [up_bias, down_bias]
    extra = {}
    if activation == "swish_alpha":
        extra["alpha"] = float(alpha)
    if limit:
        extra["limit"] = float(limit)
    if offset:
        extra["up_offset"] = float(offset)
    return imp.b.op("moe", *operands, activation=activation, gated=bool(gated), hint="moe", **extra)


# ---------------------------------------------------------------------- complex numbers
# Complex tensors (RoPE written as x * e^{i theta}, Llama 4 and DeepSeek-V2 style) are carried
# as real tensors with a trailing dim of 2 (re, im): the layout view_as_real gives them, so
# view_as_complex and view_as_real cost nothing and the rotation becomes real arithmetic.


@dataclass
class Complex:
    real: Value  # [..., 2]


def _touches_complex(imp: Importer, node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.is_complex():
        return True
    return any(isinstance(imp.env.get(a), Complex) for a in node.all_input_nodes)


COMPLEX_RULES: dict[str, Rule] = {}


def complex_rule(*targets: str):
    def deco(fn):
        for t in targets:
            COMPLEX_RULES[t] = fn
        return fn

    return deco


def _pair(imp, re: Value, im: Value) -> Complex:
    shape = list(re.type.shape)
    return Complex(imp.b.op("concat", imp.b.op("reshape", re, shape=shape + [1]),
                            imp.b.op("reshape", im, shape=shape + [1]), axis=len(shape)))


def _parts(imp, z: Complex) -> tuple[Value, Value]:
    r = z.real
    last = r.type.rank - 1
    return (imp.b.op("slice", r, axis=last, start=0, end=1, step=1),
            imp.b.op("slice", r, axis=last, start=1, end=2, step=1))


@complex_rule("aten.polar.default")
def _polar(imp, node):
    mag, angle = imp.value(node.args[0]), imp.value(node.args[1])
    return _pair(imp, imp.b.op("mul", mag, imp.b.op("cos", angle)), imp.b.op("mul", mag, imp.b.op("sin", angle)))


@complex_rule("aten.view_as_complex.default")
def _view_as_complex(imp, node):
    return Complex(imp.value(node.args[0]))


@complex_rule("aten.view_as_real.default")
def _view_as_real(imp, node):
    return imp.value(node.args[0]).real


@complex_rule("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.unsqueeze.default",
              "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default", "aten.clone.default",
              "aten.alias.default", "aten._to_copy.default", "aten.contiguous.default")
def _complex_view(imp, node):
    z = imp.value(node.args[0])
    val = node.meta["val"]
    if not val.is_complex():
        raise ImportError_(f"{node.target} at %{node.name} turns a complex tensor real")
    shape = [imp.dim(d) for d in val.shape] + [2]
    kind = "expand" if node.target == torch.ops.aten.expand.default else "reshape"
    return Complex(imp.b.op(kind, z.real, shape=shape))


@complex_rule("aten.mul.Tensor")
def _complex_mul(imp, node):
    a, b = imp.value(node.args[0]), imp.value(node.args[1])
    if not isinstance(a, Complex):
        a, b = b, a
    if not isinstance(b, Complex):  # complex times real
        if isinstance(b, Value):
            b = imp.b.op("reshape", b, shape=list(b.type.shape) + [1])
        return Complex(imp.b.op("mul", a.real, imp.as_tensor(b, a.real.type.dtype)))
    (ar, ai), (br, bi) = _parts(imp, a), _parts(imp, b)
    re = imp.b.op("sub", imp.b.op("mul", ar, br), imp.b.op("mul", ai, bi))
    im = imp.b.op("add", imp.b.op("mul", ar, bi), imp.b.op("mul", ai, br))
    return Complex(imp.b.op("concat", re, im, axis=re.type.rank - 1))


def import_program(program, module_name: str, token_symbol: str, inputs: dict[str, str],
                   output_index: int = 0) -> tuple[Module, dict[str, torch.Tensor]]:
    """Import ``program`` as function @forward(input_ids: i64[T], positions: i64[T]) -> logits [T, V].

    ``inputs`` maps the program's placeholder names to 'input_ids' or 'positions'; both are
    [1, T] in the trace and become [T] arguments (the step interface has no batch dim).
    """
    module = Module(module_name)
    imp = Importer(program, module, {})
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            for d in node.meta["val"].shape:
                if isinstance(d, torch.SymInt):
                    for s in d.node.expr.free_symbols:
                        imp.symbol_names[s.name] = token_symbol
    T = symbol(token_symbol)
    args = {role: imp.b.arg(role, TensorType((T,), "i64")) for role in ("input_ids", "positions")}
    imp.positions = args["positions"]
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            arg = args[inputs[node.name]]
            imp.input_names[node.name] = imp.b.op("reshape", arg, shape=[1, T], hint=f"{inputs[node.name]}_2d")
    # drop the reshapes for inputs the graph does not use
    outs = imp.run()
    logits = outs[output_index]
    if not isinstance(logits, Value) or logits.type.rank != 3 or logits.type.shape[0] != 1:
        raise ImportError_(f"expected logits [1, T, vocab] as output {output_index}, got {logits}")
    flat = imp.b.op("reshape", logits, shape=[T, logits.type.shape[2]], hint="logits")
    imp.b.ret(flat)
    body = imp.b.block
    used = {id(v) for op in body.ops for v in op.operands} | {id(flat)}
    body.ops = [op for op in body.ops if not (op.kind == "reshape" and op.operands[0] in args.values()
                                              and id(op.result) not in used)]
    module.add_function(Function("forward", body))
    return module, imp.weights
