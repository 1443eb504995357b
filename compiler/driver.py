"""The compile pipeline as a function: imported model → passes → target → artifact.

The CLI and the tests both call this, so what `llmc compile` does is what is tested."""

from __future__ import annotations

import logging
import time
from typing import Optional

import llmc

from .codegen import CompileOptions, get_target
from .codegen.registry import PlannedTarget
from .frontend import ImportedModel
from .passes import PassManager, get_pass


def resolve_target(name: str):
    """The target object; a planned target without a code generator raises TargetError now."""
    target = get_target(name)
    if isinstance(target, PlannedTarget):
        target.compile()
    return target


def compile_artifact(imported: ImportedModel, tokenizer, target_name: str, out_dir: str,
                     options: Optional[CompileOptions] = None, passes=None, manager_options=None,
                     source: str = "") -> dict:
    """Optimize ``imported`` (select-logits, then ``passes``, default -O2) and write the target's
    artifact to ``out_dir``. Returns the stage timings. Nothing is written if a stage fails."""
    from .passes import build_pipeline

    from .codegen.registry import default_kv_block_size

    target = resolve_target(target_name)
    options = options or CompileOptions()
    imported.module.attrs["kv_block_size"] = options.kv_block_size or default_kv_block_size(target_name)
    passes = build_pipeline(target_name, 2) if passes is None else passes
    manager = PassManager([get_pass("select-logits")] + list(passes), **(manager_options or {}))
    t0 = time.perf_counter()
    logging.getLogger("llmc.progress").info("optimizing: %d passes", len(manager.passes))
    module = manager.run(imported.module)
    imported.module = module
    timings = {"passes": time.perf_counter() - t0}
    config = imported.config
    metadata = {"llmc_version": llmc.__version__, "name": module.name, "arch": module.attrs.get("arch"),
                "vocab_size": int(config.get("vocab_size") or 0), "config": config, "source": source}
    timings.update(target.compile(module, imported.weights, out_dir, options, metadata,
                                  tokenizer))
    return timings
