"""Parser for the text form written by ``printer.py`` (one op per line).

Result types are read from the text, not re-inferred: the verifier is what checks them, so a
hand-written broken module parses and is then rejected with a precise message.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from .core import Block, Function, Module, Op, Value
from .types import TensorType, parse_dim, split_top_level

_NAME = r"[A-Za-z0-9_.]+"
_KEYWORDS = {"true": True, "false": False, "none": None, "inf": float("inf"),
             "-inf": float("-inf"), "nan": float("nan")}


class ParseError(ValueError):
    def __init__(self, message: str, line_no: int, line: str):
        super().__init__(f"line {line_no}: {message}\n    {line.strip()}")
        self.line_no = line_no


def parse_attr_value(text: str) -> Any:
    text = text.strip()
    if not text:
        raise ValueError("empty attribute value")
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"unterminated list {text!r}")
        inner = text[1:-1]
        return [parse_attr_value(p) for p in split_top_level(inner)] if inner.strip() else []
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return parse_dim(text)  # a symbolic dim such as T or 9*T


def parse_attrs(text: str) -> dict[str, Any]:
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"attributes must be written {{k = v, ...}}, got {text!r}")
    out: dict[str, Any] = {}
    for item in split_top_level(text[1:-1]):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"attribute {item!r} has no '='")
        key = key.strip()
        if key in out:
            raise ValueError(f"attribute {key!r} given twice")
        out[key] = parse_attr_value(value)
    return out


def _matching_brace(text: str, start: int) -> int:
    """Index of the '}' closing the '{' at ``start``, skipping string literals."""
    depth, i, in_str = 0, start, False
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced braces")


class _Parser:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.i = 0

    def error(self, message: str) -> ParseError:
        line = self.lines[self.i] if self.i < len(self.lines) else ""
        return ParseError(message, self.i + 1, line)

    def next_line(self) -> str:
        while self.i < len(self.lines):
            line = self.lines[self.i].strip()
            if line and not line.startswith("//"):
                return line
            self.i += 1
        raise self.error("unexpected end of input")

    def parse_module(self) -> Module:
        line = self.next_line()
        m = re.fullmatch(rf"module @({_NAME})(?: attributes (\{{.*\}}))? \{{", line)
        if not m:
            raise self.error("expected 'module @name {'")
        try:
            module = Module(m.group(1), attrs=parse_attrs(m.group(2)) if m.group(2) else {})
        except ValueError as exc:
            raise self.error(str(exc)) from None
        self.i += 1
        while True:
            line = self.next_line()
            if line == "}":
                self.i += 1
                break
            if line.startswith("param "):
                self.parse_param(module, line)
            elif line.startswith("func "):
                module.add_function(self.parse_function(line))
            else:
                raise self.error("expected 'param', 'func' or '}'")
        for rest in self.lines[self.i:]:
            if rest.strip() and not rest.strip().startswith("//"):
                raise self.error("text after the end of the module")
        return module

    def parse_param(self, module: Module, line: str) -> None:
        m = re.fullmatch(rf"param @({_NAME}) : (\S+\[.*?\])(?: (\{{.*\}}))?", line)
        if not m:
            raise self.error("expected 'param @name : type {origin = \"...\"}'")
        try:
            attrs = parse_attrs(m.group(3)) if m.group(3) else {}
            module.add_param(m.group(1), TensorType.parse(m.group(2)), attrs.get("origin", "parameter"))
        except ValueError as exc:
            raise self.error(str(exc)) from None
        self.i += 1

    def parse_typed_args(self, text: str, scope: dict[str, Value]) -> list[Value]:
        args = []
        for item in split_top_level(text):
            if not item:
                continue
            m = re.fullmatch(rf"%({_NAME}): (.+)", item)
            if not m:
                raise self.error(f"expected '%name: type', got {item!r}")
            v = Value(m.group(1), TensorType.parse(m.group(2)))
            scope[v.name] = v
            args.append(v)
        return args

    def parse_function(self, line: str) -> Function:
        m = re.fullmatch(rf"func @({_NAME})\((.*)\) -> \((.*)\) \{{", line)
        if not m:
            raise self.error("expected 'func @name(%a: type, ...) -> (types) {'")
        scope: dict[str, Value] = {}
        try:
            args = self.parse_typed_args(m.group(2), scope)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        self.i += 1
        body = self.parse_block(Block(args=args), scope, "return")
        return Function(m.group(1), body)

    def parse_block(self, block: Block, scope: dict[str, Value], terminator: str) -> Block:
        while True:
            line = self.next_line()
            if line.startswith(terminator + " ") or line == terminator:
                names = [n.strip() for n in line[len(terminator):].split(",") if n.strip()]
                block.results = [self.lookup(n, scope) for n in names]
                self.i += 1
                if self.next_line() != "}":
                    raise self.error(f"expected '}}' after '{terminator}'")
                self.i += 1
                return block
            block.ops.append(self.parse_op(line, scope))

    def lookup(self, token: str, scope: dict[str, Value]) -> Value:
        if not token.startswith("%"):
            raise self.error(f"expected a value like %x, got {token!r}")
        v = scope.get(token[1:])
        if v is None:
            # keep going with a placeholder so the verifier reports use-before-definition
            v = Value(token[1:], TensorType((), "f32"))
        return v

    def parse_op(self, line: str, scope: dict[str, Value]) -> Op:
        m = re.match(rf"((?:%{_NAME})(?:, %{_NAME})*) = ({_NAME})\(([^)]*)\)", line)
        if not m:
            raise self.error("expected '%result = kind(%operands) {attrs} : types'")
        result_names = [n.strip()[1:] for n in m.group(1).split(",")]
        kind = m.group(2)
        operands = [self.lookup(t.strip(), scope) for t in m.group(3).split(",") if t.strip()]
        rest = line[m.end():].strip()
        attrs: dict[str, Any] = {}
        try:
            if rest.startswith("{"):
                end = _matching_brace(rest, 0)
                attrs = parse_attrs(rest[: end + 1])
                rest = rest[end + 1:].strip()
            has_region = rest.endswith("{")
            if has_region:
                rest = rest[:-1].strip()
            if not rest.startswith(":"):
                raise ValueError("expected ': result types'")
            types = [TensorType.parse(t) for t in split_top_level(rest[1:])]
        except ValueError as exc:
            raise self.error(str(exc)) from None
        if len(types) != len(result_names):
            raise self.error(f"{len(result_names)} results but {len(types)} types")
        region: Optional[Block] = None
        if has_region:
            self.i += 1
            header = self.next_line()
            hm = re.fullmatch(r"\^\((.*)\):", header)
            if not hm:
                raise self.error("expected region header '^(%a: type, ...):'")
            region_scope: dict[str, Value] = {}
            try:
                region_args = self.parse_typed_args(hm.group(1), region_scope)
            except ValueError as exc:
                raise self.error(str(exc)) from None
            self.i += 1
            region = self.parse_block(Block(args=region_args), region_scope, "yield")
        else:
            self.i += 1
        results = []
        for name, t in zip(result_names, types):
            v = Value(name, t)  # a second definition of a name is the verifier's to report
            scope[name] = v
            results.append(v)
        return Op(kind, operands, attrs, results, region)


def parse_module(text: str) -> Module:
    """Parse the text form; raises ``ParseError`` naming the line on malformed input."""
    return _Parser(text).parse_module()
