"""Turn the ops of a fused region into Triton expressions, one SSA line per value.

A kernel template fixes *where* a program works (a flat block of elements, one row, a GEMM
tile) and hands the emitter the index expressions of that place: the leading indices of the
output and its last-dim index ``col``. The emitter then writes every region value as a line
``vN = ...`` evaluated at that index: region arguments become loads (broadcast operands
simply skip the dims they lack), ops become fp32 arithmetic. An op that needs a value at
another column (``rope`` reads the rotate-half partner) asks for it at that column, and
row-wide reductions (``rms_norm``) are taken once per row, so one emitter serves the
elementwise, row and GEMM-epilogue templates alike.
"""

from __future__ import annotations

from typing import Optional

from ...ir import Value
from ...ir.types import dim_str


class CodegenError(NotImplementedError):
    """The Triton code generator has no rule for this op or shape."""


FLOAT = ("f32", "f16", "bf16", "f64")


def dim_src(d) -> str:
    """A dim as source text in the kernel's scalar arguments (T, B): ``64``, ``T``, ``4*T``."""
    return str(d) if isinstance(d, int) else f"({dim_str(d)})"


def is_one(d) -> bool:
    return isinstance(d, int) and d == 1


def unravel_lines(prefix: str, flat: str, dims: list) -> tuple[list[str], list[str]]:
    """Lines computing the multi-index of ``flat`` over ``dims`` (row-major), and its names."""
    lines, names = [], [None] * len(dims)
    rest = flat
    for i in range(len(dims) - 1, -1, -1):
        if is_one(dims[i]):
            names[i] = "0"
            continue
        names[i] = f"{prefix}{i}"
        if all(is_one(d) for d in dims[:i]):
            lines.append(f"{names[i]} = {rest}")
            break
        lines.append(f"{names[i]} = {rest} % {dim_src(dims[i])}")
        lines.append(f"{prefix}r{i} = {rest} // {dim_src(dims[i])}")
        rest = f"{prefix}r{i}"
    return lines, [n if n is not None else "0" for n in names]


def offset_expr(shape: list, out_rank: int, lead: list[str], col: str) -> str:
    """Element offset of a contiguous operand of ``shape`` broadcast to an output of rank
    ``out_rank`` at (lead..., col); size-1 dims of the operand are broadcast (index 0)."""
    r = len(shape)
    if r > out_rank:
        raise CodegenError(f"operand of rank {r} in an elementwise kernel of rank {out_rank}")
    terms, stride = [], []
    for i in range(r - 1, -1, -1):
        od = out_rank - r + i
        idx = col if od == out_rank - 1 else lead[od]
        if not is_one(shape[i]) and idx != "0":
            s = "*".join(stride)
            terms.append(f"({idx})" + (f" * {s}" if s else ""))
        if not is_one(shape[i]):
            stride.append(dim_src(shape[i]))
    return " + ".join(reversed(terms)) if terms else "0"


def _lit(x: float) -> str:
    if x != x:
        return "float('nan')"
    if x in (float("inf"), float("-inf")):
        return f"float('{x}')"
    return repr(float(x))


def _tanh(e: str) -> str:
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice call needed
    return f"(1.0 - 2.0 / (tl.exp(2.0 * ({e})) + 1.0))"


def _gelu(e: str, approximate: str) -> str:
    if approximate == "tanh":
        inner = f"0.7978845608028654 * (({e}) + 0.044715 * ({e}) * ({e}) * ({e}))"
        return f"(0.5 * ({e}) * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * ({e}) * (1.0 + tl.erf(({e}) * 0.7071067811865476)))"


UNARY = {
    "neg": lambda e: f"(-{e})", "exp": lambda e: f"tl.exp({e})", "log": lambda e: f"tl.log({e})",
    "sqrt": lambda e: f"tl.sqrt({e})", "rsqrt": lambda e: f"(1.0 / tl.sqrt({e}))", "tanh": _tanh,
    "sigmoid": lambda e: f"tl.sigmoid({e})", "silu": lambda e: f"({e} * tl.sigmoid({e}))",
    "relu": lambda e: f"tl.maximum({e}, 0.0)", "cos": lambda e: f"tl.cos({e})", "sin": lambda e: f"tl.sin({e})",
    "abs": lambda e: f"tl.abs({e})", "reciprocal": lambda e: f"(1.0 / {e})",
}
BINARY = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
    "maximum": "tl.maximum({a}, {b})", "minimum": "tl.minimum({a}, {b})",
}
ACTIVATIONS = {"silu": UNARY["silu"], "gelu": lambda e: _gelu(e, "none"), "gelu_tanh": lambda e: _gelu(e, "tanh")}
ELEMENTWISE = set(UNARY) | set(BINARY) | {"pow", "cast", "glu", "gelu", "constant", "rope"}
ROW_OPS = {"rms_norm"}
TL_DTYPES = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "i64": "tl.int64", "i32": "tl.int32",
             "i16": "tl.int16", "i8": "tl.int8", "u8": "tl.uint8", "f64": "tl.float64", "bool": "tl.int1"}


class Emitter:
    """SSA lines for region values at (lead, col) of an output of ``out_shape``.

    ``leaves`` maps a value (by id) to the kernel pointer argument it is loaded from, or to a
    precomputed expression (a GEMM accumulator). ``row_mode`` allows row reductions: the
    program holds the whole last dim in ``col`` (masked by ``mask``)."""

    def __init__(self, out_shape: list, lead: list[str], col: str, mask: str, row_mode: bool):
        self.out_shape, self.lead, self.col, self.mask, self.row_mode = out_shape, lead, col, mask, row_mode
        self.lines: list[str] = []
        self.leaves: dict[int, tuple[str, str, Value]] = {}
        self.memo: dict[tuple[int, str], str] = {}
        self.row_stats: dict[int, str] = {}
        self.consts: dict[int, float] = {}
        self._n = 0

    def fresh(self, prefix: str = "v") -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def bind_pointer(self, value: Value, ptr: str) -> None:
        self.leaves[id(value)] = ("ptr", ptr, value)

    def bind_expr(self, value: Value, expr: str) -> None:
        self.leaves[id(value)] = ("expr", expr, value)

    def bind_const(self, value: Value, x: float) -> None:
        self.consts[id(value)] = x

    def get(self, v: Value, col: Optional[str] = None) -> str:
        col = col or self.col
        key = (id(v), col)
        if key in self.memo:
            return self.memo[key]
        if id(v) in self.consts:
            return _lit(self.consts[id(v)])
        leaf = self.leaves.get(id(v))
        if leaf is not None:
            kind, what, _ = leaf
            if kind == "expr":
                if col != self.col:
                    raise CodegenError("a GEMM result cannot be read at another column")
                return what
            off = offset_expr(list(v.type.shape), len(self.out_shape), self.lead, col)
            # a fully broadcast operand (a 0-d weight, a [1] tensor) is one scalar load
            load = f"tl.load({what})" if off == "0" else f"tl.load({what} + {off}, mask={self.mask}, other=0)"
            if v.type.dtype in FLOAT:
                load += ".to(tl.float32)"
            expr = load
        else:
            expr = self._op(v, col)
        name = self.fresh()
        self.lines.append(f"{name} = {expr}")
        self.memo[key] = name
        return name

    def _op(self, v: Value, col: str) -> str:
        op = v.producer
        if op is None:
            raise CodegenError(f"value %{v.name} is neither a kernel operand nor computed in the region")
        kind, a = op.kind, op.attrs
        if kind == "constant":
            return _lit(a["value"])
        ins = op.operands
        if kind in UNARY:
            return UNARY[kind](self.get(ins[0], col))
        if kind in BINARY:
            return BINARY[kind].format(a=self.get(ins[0], col), b=self.get(ins[1], col))
        if kind == "pow":
            base = self.get(ins[0], col)
            exp_op = ins[1].producer
            if exp_op is not None and exp_op.kind == "constant" and exp_op.attrs["value"] == 2.0:
                return f"({base} * {base})"
            if id(ins[1]) in self.consts and self.consts[id(ins[1])] == 2.0:
                return f"({base} * {base})"
            return f"tl.exp2({self.get(ins[1], col)} * tl.log2({base}))"  # positive bases only
        if kind == "gelu":
            return _gelu(self.get(ins[0], col), a["approximate"])
        if kind == "cast":
            x = self.get(ins[0], col)
            target = a["dtype"]
            return f"{x}.to(tl.float32)" if target in FLOAT else f"{x}.to({TL_DTYPES[target]})"
        if kind == "glu":
            return f"({ACTIVATIONS[a['activation']](self.get(ins[0], col))} * {self.get(ins[1], col)})"
        if kind == "rope":
            x, cos, sin = ins
            d = v.type.shape[-1]
            if not isinstance(d, int) or d % 2:
                raise CodegenError(f"rope over a last dim of {d}: needs an even static size")
            half = d // 2
            partner = self.fresh("c")
            self.lines.append(f"{partner} = ({col} + {half}) % {d}")
            xp = self.get(x, partner)
            rot = f"tl.where({col} < {half}, -{xp}, {xp})"
            return f"({self.get(x, col)} * {self.get(cos, col)} + {rot} * {self.get(sin, col)})"
        if kind == "rms_norm":
            if not self.row_mode:
                raise CodegenError("rms_norm needs a row kernel")
            x, w = ins
            d = x.type.shape[-1]
            if not (isinstance(d, int) and d == self.out_shape[-1]):
                raise CodegenError(f"rms_norm over a last dim {d} that is not the kernel's row ({self.out_shape[-1]})")
            if id(op) not in self.row_stats:
                xs = self.get(x, self.col)
                r = self.fresh("rstd")
                self.lines.append(f"{r} = 1.0 / tl.sqrt(tl.sum(tl.where({self.mask}, {xs} * {xs}, 0.0), axis=0) "
                                  f"/ {d} + {_lit(a['eps'])})")
                self.row_stats[id(op)] = r
            weight = self.get(w, col)
            if a.get("weight_offset"):
                weight = f"({weight} + {_lit(a['weight_offset'])})"
            return f"({self.get(x, col)} * {self.row_stats[id(op)]} * {weight})"
        raise CodegenError(f"op '{kind}' has no Triton rule (supported in fused kernels: "
                           f"{', '.join(sorted(ELEMENTWISE | ROW_OPS))})")
