"""llmc IR: types, SSA values, ops, modules, builder, text form, verifier, interpreter."""

from .builder import Builder, infer_types
from .core import Block, Function, Module, Op, Param, Value
from .interpreter import Interpreter, InterpreterError, KVCache
from .ops import OPS, OpDef, register_op
from .parser import ParseError, parse_module
from .printer import print_module
from .types import DTYPES, Dim, TensorType, parse_dim, symbol
from .verifier import VerifyError, verify

__all__ = [
    "Block", "Builder", "DTYPES", "Dim", "Function", "Interpreter", "InterpreterError", "KVCache",
    "Module", "OPS", "Op", "OpDef", "Param", "ParseError", "TensorType", "Value", "VerifyError",
    "infer_types", "parse_dim", "parse_module", "print_module", "register_op", "symbol", "verify",
]
