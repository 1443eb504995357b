"""The ``cpu`` target: TVM → LLVM native code, packaged as an llmc artifact."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import numpy as np

from ..cache import cache_root, caching_disabled
from ..ir import Module, print_module
from .registry import CompileOptions, TargetError, register_target

log = logging.getLogger("llmc.codegen")
progress = logging.getLogger("llmc.progress")


def _default_cache_dir() -> str:
    return os.path.join(cache_root(), "kernels")


def _require_tvm():
    try:
        import tvm
    except ImportError:
        raise TargetError("the cpu target needs apache-tvm: pip install 'llmc[cpu]'") from None
    return tvm


def write_safetensors(arrays: dict[str, np.ndarray], bf16: set, path: str) -> None:
    """safetensors.numpy.save_file, except that the arrays named in ``bf16`` hold bfloat16 bits
    (as uint16, numpy has no bfloat16) and are recorded as BF16, which the runtime reads back."""
    from safetensors import serialize_file
    from safetensors.numpy import TensorSpec

    specs = {name: TensorSpec(dtype="bfloat16" if name in bf16 else a.dtype.name, shape=a.shape,
                              data_ptr=a.ctypes.data, data_len=a.nbytes) for name, a in arrays.items()}
    serialize_file(specs, path, metadata=None)


def pack_weight(array: np.ndarray, pack: int) -> np.ndarray:
    """[N, K] → [N/pack, K, pack]: each block of ``pack`` output columns contiguous over K."""
    n, k = array.shape
    return np.ascontiguousarray(array.reshape(n // pack, pack, k).transpose(0, 2, 1))


KV_DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8"}  # --kv-dtype -> the manifest's (IR) dtype name


def kv_dtype(option: Optional[str], module: Module, required_flags: list[str], arch: str) -> str:
    """The KV pools' dtype (IR name) for ``--kv-dtype``. ``auto`` (the default) is float16 when
    the linears are quantized (their error dwarfs float16 storage of keys and values, and
    decode then spends a large share of a step reading the pools) and the CPU converts float16
    in vectors (F16C on x86-64; every AArch64 CPU), else float32: float artifacts stay exact."""
    option = option or "auto"
    if option == "auto":
        quantized = any(op.kind == "quantized_linear" for op in module.functions["forward"].body.walk())
        vector_f16 = arch == "aarch64" or "f16c" in required_flags
        return "f16" if quantized and vector_f16 else "f32"
    if option not in KV_DTYPES:
        raise TargetError(f"--kv-dtype {option}: expected auto, float32, float16 or int8")
    return KV_DTYPES[option]


@register_target("cpu")
class CpuTarget:
    """Kernels scheduled for the host (or ``--mcpu``) CPU; one Relax VM executable holds the
    prefill and decode steps, so a step runs without returning to Python between kernels."""

    def check(self, options: CompileOptions) -> None:
        """Fail fast (before the slow model import) on a bad --mcpu or a missing cross linker."""
        _require_tvm()
        from .llvm_cpu import linker, resolve_cpu

        linker(resolve_cpu(options.mcpu))

    def compile(self, module: Module, weights: dict, out_dir: str, options: CompileOptions,
                metadata: dict[str, Any], tokenizer=None) -> dict:
        tvm = _require_tvm()
        from llmc.runtime import artifact

        from .llvm_cpu import linker, resolve_cpu

        from .tvm.intdot import int_dot_isa
        from .tvm.lower import (PACK, AttentionOptions, cache_geometry, intdot_params, lower_to_relax, packed_params,
                                state_pools, weight_order)
        from .tvm.schedule import schedule_module
        from .tvm import vm_pipeline

        cpu = resolve_cpu(options.mcpu)
        mcpu = cpu.mcpu
        threads = options.threads or os.cpu_count() or 1
        target = cpu.tvm_target(threads)
        link = linker(cpu)  # before any work: a missing cross linker fails fast
        timings = {}
        isa = None if os.environ.get("LLMC_NO_INTDOT") else int_dot_isa(cpu.arch, cpu.required_flags)
        kv = kv_dtype(options.kv_dtype, module, cpu.required_flags, cpu.arch)
        attention = AttentionOptions(threads, cpu.vector_lanes, cpu.vector_registers, isa, kv)
        key = self._cache_key(module, f"{cpu.triple}/{cpu.name}/{isa.name if isa else 'float'}/kv-{kv}", threads,
                              tvm.__version__)
        cache_dir = options.cache_dir or _default_cache_dir()
        cached = os.path.join(cache_dir, f"{key}.so")
        geom = cache_geometry(module)
        geom.dtype = kv
        if geom.scale_bytes:  # int8: the pools' float32 view of their scales needs rows of whole floats
            shapes = geom.per_layer or [(geom.kv_heads, geom.head_dim, geom.value_dim)]
            dims = sorted({d for _, head_dim, value_dim in shapes for d in (head_dim, value_dim)})
            if any(d % geom.scale_bytes for d in dims):
                raise TargetError(f"--kv-dtype int8 needs head dims that are multiples of {geom.scale_bytes}; "
                                  f"this model's are {dims}: use --kv-dtype float16")
        layout = {"cache": geom, "packed": sorted(packed_params(module, isa)),
                  "weight_order": weight_order(module), "pack": PACK, "intdot": intdot_params(module, isa),
                  "states": [{"name": a.name, "shape": [int(d) for d in a.type.shape[1:]], "dtype": a.type.dtype}
                             for a in state_pools(module)]}
        with artifact.staged(out_dir) as stage:
            os.makedirs(os.path.join(stage, "kernels"))
            library = os.path.join(stage, artifact.STEP_LIBRARY)
            t0 = time.perf_counter()
            use_cache = not caching_disabled()
            if use_cache and os.path.exists(cached) and os.path.exists(cached + ".json"):
                shutil.copyfile(cached, library)
                with open(cached + ".json") as f:
                    kernels = json.load(f)["kernels"]
                log.info("kernel cache hit: %s", cached)
            else:
                progress.info("compiling kernels with LLVM for %s (%s)", mcpu, cpu.triple)
                relax_mod, lowered_layout = lower_to_relax(module, attention)
                assert lowered_layout["weight_order"] == layout["weight_order"]
                assert lowered_layout["intdot"] == layout["intdot"]
                assert lowered_layout["cache"].dtype == kv
                kernels = sorted(g.name_hint for g, f in relax_mod.functions.items()
                                 if isinstance(f, tvm.tirx.PrimFunc))
                log.info("lowered to TVM Relax: %d kernels (%.1fs)", len(kernels), time.perf_counter() - t0)
                scheduled = schedule_module(relax_mod)
                log.info("scheduled %d kernels", len(kernels))
                executable = tvm.compile(scheduled, target=target, relax_pipeline=vm_pipeline.relax_pipeline())
                executable.export_library(library, fcompile=link)
                if use_cache:
                    self._store_in_cache(cache_dir, cached, library, kernels)
            timings["kernels"] = time.perf_counter() - t0
            log.info("compiled kernels with LLVM for %s (%s%s) (%.1fs)", mcpu, cpu.triple,
                     ", cross-linked" if cpu.cross else "", timings["kernels"])

            t0 = time.perf_counter()
            progress.info("writing weights")
            layouts = self._write_weights(stage, weights, module, layout)
            timings["weights"] = time.perf_counter() - t0
            log.info("wrote %d weights (%.1fs)", len(layouts), timings["weights"])
            tok = self._write_tokenizer(stage, tokenizer)

            geom = layout["cache"]
            manifest = {
                "llmc_version": metadata.get("llmc_version"),
                "model": {k: v for k, v in metadata.items() if k != "llmc_version"},
                "target": {"kind": "cpu", "mcpu": mcpu, "mattr": list(cpu.mattr), "arch": cpu.arch, "triple": cpu.triple, "threads": threads,
                           "required_cpu_features": cpu.required_flags, "tvm_version": tvm.__version__},
                "dtypes": {"activations": "f32", "weights": sorted({w["dtype"] for w in layouts.values()})},
                "kernels": kernels,
                "kernel_cache_key": key,
                "plan": {
                    "library": artifact.STEP_LIBRARY,
                    "entry_points": {"prefill": "any batch: T tokens of B sequences",
                                     "decode": "exactly one token of one sequence"},
                    "arguments": ["input_ids", "positions", "slot_mapping", "block_tables", "seq_lens",
                                  "query_start", "logits_index", "k_pool_l, v_pool_l for each layer",
                                  "weights in weight_order"],
                    "weight_order": layout["weight_order"],
                    "weights": layouts,
                },
                "kv_cache": {"layers": geom.layers, "block_size": geom.block_size, "kv_heads": geom.kv_heads,
                             "head_dim": geom.head_dim, "value_dim": geom.value_dim, "dtype": geom.dtype,
                             "max_model_len": options.max_seq_len, "bytes_per_block": geom.bytes_per_block,
                             **({"layer_shapes": [list(x) for x in geom.per_layer]} if geom.per_layer else {}),
                             **({"scale_bytes": geom.scale_bytes} if geom.scale_bytes else {}),
                             "k_layout": "[blocks, kv_heads, head_dim, block_size]" if not geom.scale_bytes else
                             "[blocks, kv_heads, head_dim + scale_bytes, block_size] (int8 codes; the last "
                             "scale_bytes rows: each position's float32 scale)",
                             "v_layout": "[blocks, block_size, kv_heads, value_dim]" if not geom.scale_bytes else
                             "[blocks, block_size, kv_heads, value_dim + scale_bytes] (int8 codes, then the "
                             "position's float32 scale)"},
                "tokenizer": tok,
            }
            if layout.get("states"):  # recurrent state: one slot per running sequence (runtime/engine.py)
                manifest["state"] = {"pools": layout["states"], "layout": "[slots, *shape] per pool, after the KV "
                                                                           "pools; state_slots [B] after logits_index"}
            artifact.write_manifest(stage, manifest)
        return timings

    @staticmethod
    def _store_in_cache(cache_dir: str, cached: str, library: str, kernels: list[str]) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(library, tmp)
        with open(tmp + ".json", "w") as f:
            json.dump({"kernels": kernels}, f)
        os.replace(tmp + ".json", cached + ".json")
        os.replace(tmp, cached)

    @staticmethod
    def _cache_key(module: Module, mcpu: str, threads: int, tvm_version: str) -> str:
        """Content hash of what determines the kernels: the IR (weights excluded), the options,
        and the code generator's own source (this module's too: it sets up the build)."""
        from .tvm import attention, intdot, kernels, lower, schedule, vm_pipeline

        h = hashlib.sha256()
        text = print_module(module)
        text = "\n".join(line for line in text.splitlines() if "config = " not in line)
        h.update(text.encode())
        h.update(json.dumps([mcpu, threads, tvm_version]).encode())
        for path in [mod.__file__ for mod in (attention, intdot, kernels, lower, schedule, vm_pipeline)] + [__file__]:
            with open(path, "rb") as f:
                h.update(f.read())
        return h.hexdigest()[:32]

    @staticmethod
    def _write_weights(stage: str, weights: dict, module: Module, layout: dict) -> dict:
        from llmc.runtime import artifact

        from .tvm.intdot import interleave_blocks, repack_any, repack_groups

        packed, pack = set(layout["packed"]), layout["pack"]
        intdot = layout.get("intdot", {})
        arrays, layouts, bf16 = {}, {}, set()
        for name in layout["weight_order"]:
            w = weights[name]
            if hasattr(w, "detach") and str(w.dtype) == "torch.bfloat16":  # numpy has no bfloat16: keep the bits
                import torch

                bf16.add(name)
                w = w.detach().cpu().contiguous().view(torch.uint16)
            array = w.detach().cpu().numpy() if hasattr(w, "detach") else np.asarray(w)
            kind = "plain"
            if name in packed:
                array, kind = pack_weight(array, pack), f"packed{pack}"
            elif name in intdot:
                info = intdot[name]
                if info["role"] == "groups":
                    array = repack_groups(array, info["lanes"])
                else:
                    array = repack_any(array, info["lanes"], info["bits"], info["signed"])
                ilv = info.get("interleave", 1)
                array = interleave_blocks(array, ilv)
                kind = f"intdot{info['lanes']}-{info['role']}" + (f"-x{ilv}" if ilv > 1 else "")
            arrays[name] = array.copy(order="C")  # (ascontiguousarray would turn 0-d into 1-d)
            layouts[name] = {"shape": list(array.shape), "dtype": "bfloat16" if name in bf16 else str(array.dtype),
                             "layout": kind, "origin": module.params[name].origin}
        write_safetensors(arrays, bf16, os.path.join(stage, artifact.WEIGHTS))
        return layouts

    @staticmethod
    def _write_tokenizer(stage: str, tokenizer) -> Optional[dict]:
        from llmc.runtime import artifact

        if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
            return None
        tokenizer.backend_tokenizer.save(os.path.join(stage, artifact.TOKENIZER))
        eos = tokenizer.eos_token_id
        return {"file": artifact.TOKENIZER, "chat_template": getattr(tokenizer, "chat_template", None),
                "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or [])}
