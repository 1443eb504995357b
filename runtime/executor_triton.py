"""Runs a cuda/rocm artifact's launch plan through Triton's own launcher: the kernel sources
the compiler rendered are imported and JIT-compiled (or, with ``interpret=True``, run by
TRITON_INTERPRET=1 on CPU tensors, which is how the tests check whole steps without a GPU).

The GPU executor (executor_cuda.py) runs the same plan with the ahead-of-time binaries and no
Triton; this one needs Triton and serves as the reference runner of the plan.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import numpy as np
import torch

from .launch_plan import PlanRunner
from .step import StepBatch


def require_interpret_mode(interpret: bool) -> None:
    """Triton decides at import whether its own library functions (tl.sum, ...) are
    interpreted, so the mode must be set before the first ``import triton`` of the process."""
    want = "1" if interpret else "0"
    if "triton" in sys.modules:
        from triton import knobs

        if bool(knobs.runtime.interpret) != interpret:
            raise RuntimeError(f"triton was imported with TRITON_INTERPRET={'1' if not interpret else '0'}, but "
                               f"this executor needs TRITON_INTERPRET={want}: set it in the environment before "
                               f"anything imports triton (or run the executor in its own process)")
    else:
        os.environ["TRITON_INTERPRET"] = want


def load_kernels(src_dir: str, names, interpret: bool) -> dict:
    """Import each kernel ``name`` from ``src_dir/name.py``; ``interpret`` decides whether
    triton.jit builds an interpreted function (Triton reads TRITON_INTERPRET at decoration)."""
    require_interpret_mode(interpret)
    # JIT builds go to llmc's cache root (as the compiler's AOT builds do), not ~/.triton
    root = os.environ.get("LLMC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmc")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        out = {}
        for name in names:
            path = os.path.join(src_dir, f"{name}.py")
            mod_name = f"llmc_kernels_{'i' if interpret else 'j'}_{name}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # triton resolves globals through the module
            spec.loader.exec_module(module)
            out[name] = getattr(module, name)
        return out
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


class TritonExecutor:
    """runtime.step.Executor over a launch plan, launching kernels with Triton."""

    def __init__(self, plan: dict, src_dir: str, weights: dict, num_blocks: int, max_model_len: int,
                 vocab_size: int, interpret: Optional[bool] = None, device: Optional[str] = None):
        if interpret is None:
            interpret = not torch.cuda.is_available()
        self.device = device or ("cpu" if interpret else "cuda")
        names = sorted({e["kernel"] for e in plan["launches"]})
        self.kernels = load_kernels(src_dir, names, interpret)
        pool = next(b for b in plan["buffers"].values() if b["kind"] == "pool")
        self.block_size = int(pool["shape"][1])
        self.num_blocks, self.max_model_len, self.vocab_size = num_blocks, max_model_len, vocab_size
        self.runner = PlanRunner(plan, weights, num_blocks, self.device, self._launch)
        self.launches = 0

    @classmethod
    def from_manifest(cls, manifest, num_blocks: Optional[int] = None, interpret: Optional[bool] = None):
        """The executor of a cuda/rocm artifact, running its kernel sources through Triton."""
        from safetensors.torch import load_file

        from .artifact import ArtifactError

        if manifest.target.get("kind") not in ("cuda", "rocm"):
            raise ArtifactError(f"{manifest.root} is a '{manifest.target.get('kind')}' artifact; the Triton runner "
                                f"executes cuda/rocm artifacts")
        plan = manifest.data["plan"]
        if interpret is None:
            import torch

            interpret = not torch.cuda.is_available()
        if interpret and plan.get("dtype") == "bf16" and plan.get("arch") != "interpret":
            raise ArtifactError(f"{manifest.root} is a bf16 artifact: Triton's interpreter computes bf16 tl.dot "
                                f"wrongly, so it cannot run on the CPU; use a GPU, or compile with --dtype f16 "
                                f"(or f32) to run it under TRITON_INTERPRET=1")
        weights = load_file(manifest.path("weights.safetensors"))
        geom = manifest.kv_cache
        max_len = int(geom["max_model_len"])
        blocks = int(num_blocks or -(-max_len // int(geom["block_size"])))
        return cls(plan, manifest.path("kernels/src"), weights, blocks, max_len,
                   int(manifest.model.get("vocab_size") or 0), interpret=interpret)

    def _launch(self, name: str, grid: tuple, args: list) -> None:
        try:
            self.kernels[name][grid](*args)
        except Exception as exc:
            raise RuntimeError(f"kernel {name} failed: {exc}") from exc
        self.launches += 1

    def copy_blocks(self, pairs) -> None:
        self.runner.copy_blocks(pairs)

    def step(self, batch: StepBatch) -> np.ndarray:
        batch.validate(self.num_blocks, self.block_size)
        return self.runner.step(batch)
