"""Code generation: the target registry and the artifact writer."""

from .registry import CompileOptions, TargetError, get_target, register_target

__all__ = ["CompileOptions", "TargetError", "get_target", "register_target"]
