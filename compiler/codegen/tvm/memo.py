"""Kernel builders memoized by their arguments, and built with a fast macro lookup.

Why: lowering asks for a kernel once per op and entry point (SmolLM2: 422 integer linears
that are 12 distinct kernels), and building one from TVMScript takes 0.1-1 s, so most of
``lower_to_relax`` went to building the same PrimFuncs over and over (~170 s of a 210 s
SmolLM2 compile). A PrimFunc is immutable: the same object serves every request for it, and
``BlockBuilder.add_func`` adds it to the module once.

Most of what remains of a build is TVMScript finding its parser at each macro call: it asks
``inspect.getouterframes``, which reads the source file of every frame on the stack and, for
the parser's ``<ast>`` frames, scans all of ``sys.modules`` (thousands of modules once torch and
transformers are imported; CPython issue 92041). The same search over the frames' globals
without reading any source makes a build ~3x faster; it is installed only while a builder runs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _frozen(value):
    """Lists (an attribute such as ALiBi slopes) as tuples, so the arguments can key a cache."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@contextlib.contextmanager
def fast_macro_lookup():
    """While inside: TVMScript macros find the parser by walking the frames' globals (what
    ``ScriptMacro._find_parser_def`` looks for) instead of through ``inspect``. A TVM without
    that method keeps its own lookup."""
    try:
        from tvm.script.parser.core.parser import ScriptMacro
    except ImportError:
        yield
        return
    original = ScriptMacro.__dict__.get("_find_parser_def")
    name = getattr(ScriptMacro, "parser_object_name", None)
    if original is None or not isinstance(name, str):
        yield
        return

    def _find_parser_def(self):
        frame = sys._getframe(1)
        while frame is not None:
            parser = frame.f_globals.get(name)
            if parser is not None:
                return parser
            frame = frame.f_back
        return original(self)  # none found: TVM's own lookup raises its own error

    ScriptMacro._find_parser_def = _find_parser_def
    try:
        yield
    finally:
        ScriptMacro._find_parser_def = original


def memoized_kernel(builder: F) -> F:
    """``builder`` with its results kept per distinct arguments (lists compared as tuples, 1 and
    1.0 kept apart), built under :func:`fast_macro_lookup`; a call with an argument that cannot
    be hashed builds without the cache. ``__wrapped__`` is the plain builder."""

    def fast(*args, **kwargs):
        with fast_macro_lookup():
            return builder(*args, **kwargs)

    cached = functools.lru_cache(maxsize=256, typed=True)(fast)

    @functools.wraps(builder)
    def build(*args, **kwargs):
        args = tuple(_frozen(a) for a in args)
        kwargs = {k: _frozen(v) for k, v in kwargs.items()}
        try:
            hash((args, tuple(kwargs.items())))
        except TypeError:
            return fast(*args, **kwargs)
        return cached(*args, **kwargs)

    build.cache_info = cached.cache_info  # type: ignore[attr-defined]
    build.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return build  # type: ignore[return-value]
