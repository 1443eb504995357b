"""Tensor types of the IR: a dtype plus a shape whose dims are ints or symbolic expressions.

Symbolic dims are sympy expressions over positive integer symbols (``T`` is the flat token
count of a step). sympy is used because torch.export already describes dynamic shapes with
it, so imported shapes like ``T + 1`` or ``9*T`` need no translation layer of our own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import sympy

DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")
INT_DTYPES = ("i64", "i32", "i16", "i8", "u8")

Dim = Union[int, sympy.Expr]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL_CACHE: dict[str, sympy.Symbol] = {}


def symbol(name: str) -> sympy.Symbol:
    """The one symbol of that name; all symbolic dims are positive integers."""
    sym = _SYMBOL_CACHE.get(name)
    if sym is None:
        sym = sympy.Symbol(name, integer=True, positive=True)
        _SYMBOL_CACHE[name] = sym
    return sym


def normalize_dim(d) -> Dim:
    """Ints stay ints; sympy integers become ints; other expressions stay symbolic."""
    if isinstance(d, bool):
        raise TypeError(f"a dim cannot be a bool: {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Basic):
        if d.is_Integer:
            return int(d)
        return d
    raise TypeError(f"a dim must be an int or a sympy expression, got {type(d).__name__} {d!r}")


def parse_dim(text: str) -> Dim:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    names = {n: symbol(n) for n in _IDENT.findall(text)}
    try:
        expr = sympy.parse_expr(text, local_dict=names, evaluate=True)
    except Exception as exc:  # sympy raises many kinds
        raise ValueError(f"cannot parse dim {text!r}: {exc}") from None
    return normalize_dim(expr)


def dim_str(d: Dim) -> str:
    return str(d)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def dim_symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in d.free_symbols}


def eval_dim(d: Dim, bindings: dict[str, int]) -> int:
    """The concrete value of a dim once its symbols are bound."""
    if isinstance(d, int):
        return d
    value = d.subs({symbol(k): v for k, v in bindings.items()})
    if not value.is_Integer:
        raise ValueError(f"dim {d} is not determined by bindings {bindings}")
    return int(value)


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = normalize_dim(out * d) if not (isinstance(out, int) and isinstance(d, int)) else out * d
    return out


@dataclass(frozen=True)
class TensorType:
    shape: tuple
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def same_as(self, other: "TensorType") -> bool:
        """Equality up to symbolic simplification (``2*T`` equals ``T + T``)."""
        return (
            self.dtype == other.dtype
            and self.rank == other.rank
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape))
        )

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(dim_str(d) for d in self.shape)}]"

    @staticmethod
    def parse(text: str) -> "TensorType":
        m = re.fullmatch(r"\s*([a-z0-9]+)\[(.*)\]\s*", text)
        if not m:
            raise ValueError(f"cannot parse tensor type {text!r}; expected e.g. f32[T, 576]")
        dtype, body = m.groups()
        dims = [parse_dim(p) for p in split_top_level(body)] if body.strip() else []
        return TensorType(tuple(dims), dtype)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, parentheses, braces and string literals."""
    parts, depth, cur, in_str, i = [], 0, [], False, 0
    while i < len(text):
        ch = text[i]
        if in_str:
            cur.append(ch)
            if ch == "\\":
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
            cur.append(ch)
        elif ch in "([{":
            depth += 1
            cur.append(ch)
        elif ch in ")]}":
            depth -= 1
            cur.append(ch)
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if cur or parts:
        parts.append("".join(cur))
    return [p.strip() for p in parts]
