"""Targets: each is a registry entry that turns an optimized IR module into an artifact.

Adding a target means registering a class here; the passes never change for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


class TargetError(ValueError):
    """The target cannot compile this (unknown target, missing toolchain, bad option)."""


@dataclass
class CompileOptions:
    mcpu: Optional[str] = None         # cpu: LLVM CPU name (default: this machine)
    threads: Optional[int] = None      # cpu: threads the kernels are built for (default: all cores)
    max_seq_len: int = 2048            # most tokens one sequence may hold (prompt + output)
    kv_block_size: Optional[int] = None  # positions per KV block (default: the target's)
    arch: Optional[str] = None         # cuda/rocm: sm_80|sm_89|sm_90, gfx90a|gfx942|gfx1100 (default sm_90 / gfx942)
    dtype: Optional[str] = None        # cuda/rocm: activations, weights and KV cache: bf16 (default), f16, f32
    kv_dtype: Optional[str] = None     # cpu: KV pools auto (default: float16 for quantized linears), float32, float16, int8
    cache_dir: Optional[str] = None    # compiled-kernel cache (default <cache root>/kernels, see compiler/cache.py)
    extra: dict = field(default_factory=dict)


TARGETS: dict[str, Callable[[], object]] = {}


def register_target(name: str):
    def deco(cls):
        TARGETS[name] = cls
        cls.name = name
        return cls

    return deco


def get_target(name: str):
    _load_builtin()
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}'; known: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]()


def default_kv_block_size(target: str) -> int:
    """Positions per KV block when --kv-block-size is not given: the cpu attention kernel walks
    one block per online-softmax step, and 32 positions keep that bookkeeping small; GPUs use
    vLLM's 16."""
    return 32 if target == "cpu" else 16


class PlannedTarget:
    """A target in the design that this build does not generate code for yet."""

    def compile(self, *args, **kwargs):
        raise TargetError(f"target '{self.name}' has no code generator in this build yet; "
                          f"use --target cpu, or --emit ir to inspect the optimized IR")


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Register the built-in targets once. A flag, not "cpu" in TARGETS: importing the cpu
    module directly registers cpu alone, and must not hide cuda/rocm afterwards."""
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from . import cpu  # noqa: F401  (registers "cpu")
        from .triton import target  # noqa: F401  (registers "cuda" and "rocm"; imports triton only to compile)
        from . import metal  # noqa: F401  (registers "metal")
        for planned in ():
            TARGETS.setdefault(planned, type(f"{planned.title()}Target", (PlannedTarget,), {"name": planned}))
