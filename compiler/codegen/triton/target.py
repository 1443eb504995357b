"""The ``cuda`` and ``rocm`` targets: Triton kernels rendered from templates, compiled ahead
of time for one GPU architecture, packaged with the launch plan as an llmc artifact.

Artifact (besides manifest.json, weights.safetensors and tokenizer.json):

    kernels/src/NAME.py         the rendered Triton source of every kernel (the Triton runner
                                JIT-compiles these; they also document what the binary is)
    kernels/ARCH/NAME.cubin     (cuda) the binary, plus NAME.ptx
    kernels/ARCH/NAME.hsaco     (rocm) the code object, plus NAME.amdgcn

The manifest holds the launch plan (buffers, ordered launches with grid rules and argument
lists) and each kernel's launch metadata (symbol, argument order and types, num_warps, shared
memory, scratch sizes). Nothing here imports triton until ``compile`` runs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ...ir import Module
from ..registry import CompileOptions, TargetError, register_target
from .aot import BINARY, CUDA_ARCHS, ROCM_ARCHS, AotError, compile_kernels, triton_version
from .emit import CodegenError
from .plan import DTYPES, PlanOptions, lower_to_plan

log = logging.getLogger("llmc.codegen")
progress = logging.getLogger("llmc.progress")

DEFAULT_ARCH = {"cuda": "sm_90", "rocm": "gfx942"}


class _TritonTarget:
    kind = "cuda"
    archs: dict = {}

    def _arch(self, options: CompileOptions) -> str:
        arch = options.arch or DEFAULT_ARCH[self.kind]
        if arch not in self.archs:
            raise TargetError(f"--arch {arch} is not a {self.kind} architecture llmc builds for; use one of "
                              f"{', '.join(self.archs)}")
        return arch

    def check(self, options: CompileOptions) -> None:
        """Fail fast (before the slow model import): unknown arch or dtype, no triton."""
        self._arch(options)
        if options.dtype and options.dtype not in DTYPES:
            raise TargetError(f"--dtype {options.dtype} is not supported on {self.kind}; use one of "
                              f"{', '.join(DTYPES)}")
        try:
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                raise ImportError
        except ImportError:
            raise TargetError(f"the {self.kind} target needs triton: pip install 'llmc[{self.kind}]'") from None

    def compile(self, module: Module, weights: dict, out_dir: str, options: CompileOptions,
                metadata: dict[str, Any], tokenizer=None) -> dict:
        from llmc.runtime import artifact

        from ..cpu import CpuTarget
        from ..recurrent_refusal import refuse_recurrent_state

        self.check(options)
        arch = self._arch(options)
        dtype = options.dtype or "bf16"
        timings = {}
        t0 = time.perf_counter()
        refuse_recurrent_state(module, self.kind)
        try:
            plan = lower_to_plan(module, PlanOptions(arch=arch, dtype=dtype))
        except CodegenError as exc:
            raise TargetError(f"{self.kind}: {exc}") from None
        log.info("lowered to a launch plan: %d launches of %d distinct kernels (%.1fs)", len(plan.launches),
                 len(plan.kernels), time.perf_counter() - t0)
        with artifact.staged(out_dir) as stage:
            src_dir = os.path.join(stage, "kernels", "src")
            plan.write_sources(src_dir)
            t0 = time.perf_counter()
            progress.info("compiling %d Triton kernels for %s %s", len(plan.kernels), self.kind, arch)
            try:
                kernel_meta = compile_kernels(list(plan.kernels.values()), self.kind, arch,
                                              os.path.join(stage, "kernels", arch), src_dir)
            except AotError as exc:
                raise TargetError(str(exc)) from None
            timings["kernels"] = time.perf_counter() - t0
            log.info("compiled %d kernels for %s %s (%.1fs)", len(kernel_meta), self.kind, arch, timings["kernels"])
            for name, k in plan.kernels.items():
                kernel_meta[name].update(kind=k.kind, template=k.template, source=f"src/{name}.py")
            t0 = time.perf_counter()
            progress.info("writing weights")
            layouts = self._write_weights(stage, weights, plan)
            timings["weights"] = time.perf_counter() - t0
            tok = CpuTarget._write_tokenizer(stage, tokenizer)
            pools = {name: [int(x) if str(x).isdigit() else x for x in buf["shape"]]
                     for name, buf in plan.buffers.items() if buf["kind"] == "pool"}
            k_shape = next(shape for name, shape in pools.items() if name.startswith("k_pool_"))
            v_shape = next(shape for name, shape in pools.items() if name.startswith("v_pool_"))
            _, bs, hkv, d = k_shape
            dv = v_shape[-1]  # the value width may differ from the key width
            itemsize = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
            binary, asm = BINARY[self.kind]
            manifest = {
                "llmc_version": metadata.get("llmc_version"),
                "model": {k: v for k, v in metadata.items() if k != "llmc_version"},
                "target": {"kind": self.kind, "arch": arch, "triton_version": triton_version(),
                           "binary_format": binary, "asm_format": asm,
                           "toolchain": _toolchain_versions(self.kind)},
                "dtypes": {"activations": dtype, "weights": dtype, "kv_cache": dtype, "logits": "f32"},
                "kernels": kernel_meta,
                "kernel_dir": f"kernels/{arch}",
                "plan": {**plan.to_json(), "weights": layouts, "weight_order": list(layouts)},
                "kv_cache": {"layers": len(pools) // 2, "block_size": bs, "kv_heads": hkv, "head_dim": d,
                             "value_dim": dv, "dtype": dtype, "max_model_len": options.max_seq_len,
                             "bytes_per_block": sum(shape[1] * shape[2] * shape[3] for shape in pools.values()) * itemsize,
                             "k_layout": "[blocks, block_size, kv_heads, head_dim]",
                             "v_layout": "[blocks, block_size, kv_heads, value_dim]"},
                "tokenizer": tok,
            }
            artifact.write_manifest(stage, manifest)
        return timings

    @staticmethod
    def _write_weights(stage: str, weights: dict, plan) -> dict:
        """Weights in the plan's dtypes (bf16 by default), in the plan's buffer order."""
        import torch
        from safetensors.torch import save_file

        from llmc.runtime import artifact
        from llmc.runtime.launch_plan import TORCH_DTYPES

        tensors, layouts = {}, {}
        for name, b in plan.buffers.items():
            if b["kind"] != "weight":
                continue
            w = weights[name]
            w = w if isinstance(w, torch.Tensor) else torch.as_tensor(w)
            t = w.detach().to(TORCH_DTYPES[b["dtype"]]).contiguous()
            tensors[name] = t
            layouts[name] = {"shape": list(t.shape), "dtype": b["dtype"], "layout": "plain"}
        save_file(tensors, os.path.join(stage, artifact.WEIGHTS))
        return layouts


def _toolchain_versions(kind: str) -> dict:
    """Versions that decide the binaries: Triton, and the ptxas it bundles (cuda)."""
    import subprocess

    out = {"triton": triton_version()}
    if kind == "cuda":
        try:
            import importlib.util

            root = importlib.util.find_spec("triton").submodule_search_locations[0]
            ptxas = os.path.join(root, "backends", "nvidia", "bin", "ptxas")
            text = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=30).stdout
            out["ptxas"] = text.strip().splitlines()[-1] if text.strip() else "unknown"
        except Exception:
            out["ptxas"] = "unknown"
    return out


@register_target("cuda")
class CudaTarget(_TritonTarget):
    """NVIDIA GPUs: cubin + PTX per kernel for one SM architecture."""

    kind = "cuda"
    archs = CUDA_ARCHS


@register_target("rocm")
class RocmTarget(_TritonTarget):
    """AMD GPUs: hsaco code objects + AMDGCN per kernel for one gfx architecture."""

    kind = "rocm"
    archs = ROCM_ARCHS
