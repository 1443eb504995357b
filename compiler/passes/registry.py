"""Where passes are found: llmc's own, the ``llmc.passes`` entry point group, and
``module:name`` specs from the command line; and the named pipelines per target and -O level.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Callable, Optional

from .base import Pass, _CallablePass

PassFactory = Callable[[], Pass]
PASSES: dict[str, PassFactory] = {}
ENTRY_POINT_GROUP = "llmc.passes"


class PassNotFound(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def register_pass(obj):
    """Register a Pass subclass (or instance) under its ``name``; usable as a decorator."""
    name = obj.name
    if not name:
        raise ValueError(f"{obj!r} has no name")
    if name in PASSES:
        raise ValueError(f"a pass named {name!r} is already registered")
    PASSES[name] = obj if inspect.isclass(obj) else (lambda o=obj: o)
    return obj


def as_pass(obj, origin: str) -> Pass:
    """Turn what a plugin exposes (Pass instance or subclass, or a function) into a Pass."""
    if isinstance(obj, Pass):
        return obj
    if inspect.isclass(obj) and issubclass(obj, Pass):
        return obj()
    if callable(obj):
        name = getattr(obj, "__name__", origin).replace("_", "-")
        doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
        return _CallablePass(obj, name, (), (), doc)
    raise TypeError(f"{origin} is not a pass: expected a Pass, a Pass subclass or a function Module -> Module")


def load_pass_spec(spec: str) -> Pass:
    """Load ``package.module:attribute`` as a pass."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PassNotFound(f"--pass {spec!r}: expected MODULE:NAME, e.g. my_passes:FoldMyOps")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PassNotFound(f"--pass {spec!r}: cannot import {module_name}: {exc}") from None
    if not hasattr(module, attr):
        raise PassNotFound(f"--pass {spec!r}: module {module_name} has no attribute {attr}")
    return as_pass(getattr(module, attr), spec)


def plugin_passes() -> dict[str, Pass]:
    """Passes other packages expose through the ``llmc.passes`` entry point group."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        p = as_pass(ep.load(), f"entry point {ep.name} ({ep.value})")
        found[ep.name] = p
    return found


def get_pass(name: str) -> Pass:
    _load_builtin()
    if name in PASSES:
        return PASSES[name]()
    plugins = plugin_passes()
    if name in plugins:
        return plugins[name]
    raise PassNotFound(f"no pass named {name!r}; known: {', '.join(sorted(list(PASSES) + list(plugins)))}")


def all_passes() -> dict[str, Pass]:
    _load_builtin()
    out = {name: factory() for name, factory in PASSES.items()}
    out.update(plugin_passes())
    return out


# ---------------------------------------------------------------------- pipelines

CLEANUP = ["canonicalize", "constant-fold", "cse", "dce"]
# Lowerings every level ends with: code generators need the paged, batched step.
LOWERING = ["paged-kv"]
PIPELINES: dict[int, list[str]] = {
    0: LOWERING,
    1: CLEANUP + LOWERING,
    2: CLEANUP + ["recognize-rms-norm", "recognize-rope", "recognize-gated-mlp", "rope-layout"] + CLEANUP
       + ["fuse-elementwise"] + LOWERING,
}
PIPELINES[3] = PIPELINES[2]
# Targets may override a level; a target not listed uses PIPELINES.
TARGET_PIPELINES: dict[str, dict[int, list[str]]] = {}


def pipeline_names(target: str, level: int) -> list[str]:
    if level not in PIPELINES:
        raise ValueError(f"-O{level} is not a level; choose one of {sorted(PIPELINES)}")
    return list(TARGET_PIPELINES.get(target, {}).get(level, PIPELINES[level]))


def build_pipeline(target: str, level: int, extra: Optional[list[Pass]] = None,
                   after: Optional[str] = None) -> list[Pass]:
    """The passes of (target, level), with ``extra`` inserted after the pass named ``after``
    (every occurrence's first), or, when ``after`` is None, before the closing lowerings (so a
    plugin pass sees the same ``attention`` ops the optimization passes do)."""
    names = pipeline_names(target, level)
    passes = [get_pass(n) for n in names]
    extra = list(extra or [])
    if not extra:
        return passes
    if after is None:
        cut = len(names)
        while cut > 0 and names[cut - 1] in LOWERING:
            cut -= 1
        return passes[:cut] + extra + passes[cut:]
    if after not in names:
        raise PassNotFound(f"--pass-after {after!r}: no such pass in the -O{level} pipeline for {target} "
                           f"({', '.join(names) or 'empty'})")
    i = names.index(after) + 1
    return passes[:i] + extra + passes[i:]


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("llmc.compiler.passes.builtin")
