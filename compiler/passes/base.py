"""What a pass is: a named, documented transformation Module → Module.

A pass states what it ``requires`` and what it ``guarantees`` (short, human-readable facts
such as "verified", "no-noop-views", "rms_norm-recognized"); the PassManager records the
guarantees so a later pass can check its requirements. Passes mutate the module in place
and return it. They import the IR only, never a target.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from ..ir import Function, Module


class Pass:
    """Base class. Subclasses set ``name`` and implement ``run(module) -> module``."""

    name: str = ""
    requires: tuple[str, ...] = ()
    guarantees: tuple[str, ...] = ()

    def run(self, module: Module) -> Module:
        raise NotImplementedError

    def __call__(self, module: Module) -> Module:
        return self.run(module)

    @property
    def doc(self) -> str:
        return (type(self).__doc__ or "").strip().splitlines()[0] if type(self).__doc__ else ""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A pass that transforms each function on its own."""

    def run(self, module: Module) -> Module:
        for fn in module.functions.values():
            self.run_on_function(fn, module)
        return module

    def run_on_function(self, fn: Function, module: Module) -> None:
        raise NotImplementedError


class _CallablePass(Pass):
    def __init__(self, fn: Callable[[Module], Optional[Module]], name: str, requires, guarantees, doc):
        self.fn, self.name = fn, name
        self.requires, self.guarantees = tuple(requires), tuple(guarantees)
        self._doc = doc

    @property
    def doc(self) -> str:
        return self._doc

    def run(self, module: Module) -> Module:
        out = self.fn(module)
        return module if out is None else out


def module_pass(name: str, requires: Iterable[str] = (), guarantees: Iterable[str] = ()):
    """Decorator: make a plain function ``Module -> Module | None`` a pass."""

    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return _CallablePass(fn, name, requires, guarantees, doc)

    return deco
