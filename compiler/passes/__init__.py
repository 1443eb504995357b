"""Passes: the Pass abstraction, the PassManager, the registry and pipelines, and the passes."""

from .base import FunctionPass, Pass, module_pass
from .manager import PassError, PassManager, PassRecord
from .registry import (PassNotFound, all_passes, build_pipeline, get_pass, load_pass_spec,
                       pipeline_names, register_pass)
from .rewrite import Const, Match, P, Rewrite, Var, apply_rewrites, replace_all_uses

__all__ = ["Const", "FunctionPass", "Match", "P", "Pass", "PassError", "PassManager", "PassNotFound",
           "PassRecord", "Rewrite", "Var", "all_passes", "apply_rewrites", "build_pipeline", "get_pass",
           "load_pass_spec", "module_pass", "pipeline_names", "register_pass", "replace_all_uses"]
