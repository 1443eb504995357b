"""The ``metal`` target: Apple-silicon artifacts built on any machine, run by TVM's Metal runtime.

It reuses the cpu target's TVM path (the TE kernels of ``tvm/kernels.py`` and the Relax
lowering of ``tvm/lower.py``, i.e. the same paged, batched step with the same kernel list) and
changes three things:

- storage: activations, float weights and the KV pools in fp16 by default (``--dtype f16``;
  ``f32`` keeps everything fp32); every kernel widens what it loads to fp32 and narrows what it
  stores, so arithmetic and accumulation stay fp32. Values computed from positions alone (the
  RoPE tables) and the logits stay fp32, as on cuda/rocm.
- schedules: ``tvm/gpu_schedule.py`` (GEMV for decode, shared-memory tiled GEMM for prefill,
  dlight reductions and fallback); the attention kernels of ``tvm/gpu_attention.py``.
- code: ``tvm.compile`` for a Metal target emits Metal Shading Language (no Xcode needed) and
  the host side of the Relax VM executable for ``arm64-apple-macos``; zig's cross toolchain
  links that into a Mach-O arm64 dylib whose TVM runtime symbols resolve when the Mac's
  ``libtvm_runtime`` loads it (``-undefined dynamic_lookup``).

Artifact: ``kernels/step.dylib`` (host code + the MSL, which TVM's Metal runtime compiles on
the Mac when the library loads), ``kernels/step.metal`` (the same MSL, readable),
``weights.safetensors``, ``tokenizer.json`` and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import re
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

from ..ir import Module, Value
from .recurrent_refusal import refuse_recurrent_state
from .registry import CompileOptions, TargetError, register_target

log = logging.getLogger("llmc.codegen")
progress = logging.getLogger("llmc.progress")

# Every Apple GPU family TVM's Metal backend targets gets the same kernels: TVM's MSL codegen
# has no per-family switches, and the limits used by the schedules (1024 threads and 32 KiB
# threadgroup memory per threadgroup, SIMD width 32) are the same on M1..M4. The arch only
# names the host CPU LLVM tunes the Relax VM's host code for.
ARCHS = {"apple-m1": "apple-m1", "apple-m2": "apple-m2", "apple-m3": "apple-m3", "apple-m4": "apple-m4"}
DEFAULT_ARCH = "apple-m1"
MIN_MACOS = "13.0"  # what the dylib is linked for (macOS Ventura, Apple silicon)
HOST_TRIPLE = "arm64-apple-macos"
DTYPES = ("f16", "f32")
LIBRARY = "kernels/step.dylib"
SOURCE = "kernels/step.metal"
FLOAT = ("f32", "f16", "bf16", "f64")


def metal_target(arch: str = DEFAULT_ARCH):
    import tvm

    return tvm.target.Target({"kind": "metal", "max_threads_per_block": 1024, "thread_warp_size": 32,
                              "max_shared_memory_per_block": 32768, "max_function_args": 31},
                             host={"kind": "llvm", "mtriple": HOST_TRIPLE, "mcpu": ARCHS[arch]})


def _storage_backend(module: Module, act: str, gpu: bool = True):
    """The lowering Backend of the metal target (see tvm/lower.py's Backend); ``gpu=False``
    builds the attention kernels with serial loops instead of thread bindings (CPU checks)."""
    from .tvm.gpu_attention import attention_rows, kv_append_kernel, paged_attention_kernel
    from .tvm.kernels import TVM_DTYPES
    from .tvm.lower import Backend

    fn = module.functions["forward"]
    dependent: set[int] = set()
    weight_act: set[str] = set()
    keep: set[str] = set()  # quantization scales and mins keep their own dtype
    for a in fn.args:
        if a.name == "input_ids" or a.name.startswith(("k_pool_", "v_pool_")):
            dependent.add(id(a))
    for op in fn.ops:
        if op.kind in ("quantized_linear", "quantized_embedding"):
            for v in op.operands[1:]:
                if v.producer is not None and v.producer.kind == "param":
                    keep.add(v.producer.attrs["name"])
        if any(id(v) in dependent for v in op.operands):
            for r in op.results:
                dependent.add(id(r))
            for v in op.operands:
                if v.producer is not None and v.producer.kind == "param":
                    weight_act.add(v.producer.attrs["name"])
    logits: set[int] = set()
    v = fn.results[0]
    while True:
        logits.add(id(v))
        if v.producer is None or v.producer.kind != "reshape":
            break
        v = v.producer.operands[0]

    class MetalBackend(Backend):
        kv_dtype = act

        def param_storage(self, name: str) -> str:
            t = module.params[name].type
            if t.dtype == "f32" and name in weight_act and name not in keep:
                return act
            return t.dtype

        def storage(self, value: Value) -> str:
            dtype = value.type.dtype
            if dtype not in FLOAT:
                return dtype
            if value.producer is not None and value.producer.kind == "param":
                return self.param_storage(value.producer.attrs["name"])
            if id(value) in logits or id(value) not in dependent or dtype != "f32":
                return dtype
            return act

        def kv_append_kernel(self, geom, keys: bool):
            dim = geom.head_dim if keys else geom.value_dim
            return kv_append_kernel(geom.kv_heads, dim, geom.block_size, keys, TVM_DTYPES[act], gpu)

        def paged_attention_kernel(self, op, geom, decode: bool, dtype: str):
            q = op.operands[0]
            if self.storage(q) != act:
                raise TargetError(f"paged_attention reads queries stored as {self.storage(q)}, the pools as {act}")
            hq = int(q.type.shape[1])
            sinks = len(op.operands) == 7
            sink_dtype = TVM_DTYPES[self.storage(op.operands[6])] if sinks else "float32"
            return paged_attention_kernel(hq, geom.kv_heads, geom.head_dim, geom.value_dim, geom.block_size,
                                          op.attrs["scale"], op.attrs["window"], op.attrs["softcap"],
                                          attention_rows(hq // geom.kv_heads, decode), sinks,
                                          TVM_DTYPES[act], sink_dtype, dtype, gpu)

    return MetalBackend()


def relax_pipeline(target):
    """TVM's GPU pipeline without its legalize/fuse/dlight stage: the kernels come scheduled
    from gpu_schedule.py (TVM's default would re-fuse them and apply dlight's gpu.Matmul, which
    crashes for Metal), reshapes stay views."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(gpu.dataflow_lower_passes(target) + gpu.finalize_passes(target))(mod)

    del relax
    return _pipeline


def lower_for_metal(module: Module, dtype: str = "f16", gpu: bool = True):
    """(Relax module, layout, backend): the cpu target's lowering with the metal storage rules.
    ``gpu=False``: the attention kernels' same bodies in serial loops, and nothing here is
    scheduled, so ``tvm.compile`` for llvm runs the whole step on the CPU (numerics checks)."""
    from .tvm.lower import lower_to_relax

    backend = _storage_backend(module, dtype, gpu)
    relax_mod, layout = lower_to_relax(module, backend=backend)
    return relax_mod, layout, backend


def stored_weights(weights: dict, layout: dict, backend) -> dict[str, np.ndarray]:
    """The weights in the dtypes the kernels read (fp16 where the backend stores them so),
    unpacked; the artifact writer packs them as the cpu target does."""
    out = {}
    for name in layout["weight_order"]:
        w = weights[name]
        array = w.detach().cpu().numpy() if hasattr(w, "detach") else np.asarray(w)
        if backend.param_storage(name) == "f16" and array.dtype == np.float32:
            array = array.astype(np.float16)
        out[name] = array
    return out


def metal_source(executable) -> str:
    """The MSL of every kernel of a compiled executable (TVM's metal module in its import tree)."""
    found = []

    def walk(mod):
        if mod.kind == "metal":
            found.append(mod.inspect_source())
        for child in mod.imports:
            walk(child)

    walk(executable.mod)
    if not found:
        raise TargetError("tvm.compile produced no Metal module; is this TVM built with the metal codegen?")
    return "\n".join(found)


def msl_functions(source: str) -> list[str]:
    return re.findall(r"kernel void (\w+)\(", source)


def kernel_functions(kernels: list[str], source: str) -> dict[str, list[str]]:
    """Which MSL functions each PrimFunc became (TVM names them ``<primfunc>_kernel[N]``)."""
    names = msl_functions(source)
    out = {}
    for k in kernels:
        out[k] = [n for n in names if re.fullmatch(re.escape(k) + r"_kernel(_?\d+)?", n)]
    return out


def linker(min_macos: str = MIN_MACOS):
    """``fcompile`` for export_library: a Mach-O arm64 dylib through zig's clang/lld, with the TVM
    runtime's symbols left to resolve at load time (the Mac's libtvm_runtime provides them)."""
    try:
        import ziglang  # noqa: F401
    except ImportError:
        raise TargetError("the metal target links its macOS dylib with zig's cross toolchain: "
                          "pip install 'llmc[cross]' (the ziglang package)") from None
    command = [sys.executable, "-m", "ziglang", "cc", "-target", f"aarch64-macos.{min_macos}"]

    def link(output: str, objects: list[str], options=None, **_):
        result = subprocess.run(command + ["-shared", "-fPIC", "-o", output, *objects,
                                           "-Wl,-undefined,dynamic_lookup"], capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"linking the macOS arm64 kernel library failed ({' '.join(command)}):\n"
                              f"{result.stderr[-2000:]}")

    link.output_format = "dylib"
    return link


def refuse_unsupported(module: Module) -> None:
    """Name what the Metal kernels cannot compute before anything is built: recurrent-state ops,
    ALiBi biases and chunked attention exist only in the cpu kernels (a silent fallback to plain
    causal attention would produce wrong tokens)."""
    refuse_recurrent_state(module, "metal")
    for op in module.functions["forward"].ops:
        if op.kind not in ("attention", "paged_attention"):
            continue
        if op.attrs.get("alibi"):
            raise TargetError(f"metal: the attention kernels have no ALiBi position biases ({op.kind} alibi, "
                              f"Bloom/MPT-style models); compile this model for --target cpu")
        if op.attrs.get("chunk", 0):
            raise TargetError(f"metal: the attention kernels have no chunked attention ({op.kind} chunk="
                              f"{op.attrs['chunk']}, Llama 4's local layers); compile this model for --target cpu")


@register_target("metal")
class MetalTarget:
    """Apple-silicon GPU kernels (MSL) plus the Relax VM host code as a macOS arm64 dylib."""

    def _arch(self, options: CompileOptions) -> str:
        arch = options.arch or DEFAULT_ARCH
        if arch not in ARCHS:
            raise TargetError(f"--arch {arch} is not an Apple-silicon GPU llmc builds for; use one of "
                              f"{', '.join(ARCHS)} (all get the same kernels)")
        return arch

    def _dtype(self, options: CompileOptions) -> str:
        dtype = options.dtype or "f16"
        if dtype not in DTYPES:
            raise TargetError(f"--dtype {dtype} is not supported on metal (Apple GPUs before M3 have no fast "
                              f"bf16); use f16 (default) or f32")
        return dtype

    def check(self, options: CompileOptions) -> None:
        """Fail fast (before the slow model import): bad arch or dtype, no TVM, no zig."""
        self._arch(options)
        self._dtype(options)
        try:
            import tvm  # noqa: F401
        except ImportError:
            raise TargetError("the metal target needs apache-tvm: pip install 'llmc[cpu]'") from None
        linker()

    def compile(self, module: Module, weights: dict, out_dir: str, options: CompileOptions,
                metadata: dict[str, Any], tokenizer=None) -> dict:
        import tvm

        from llmc.runtime import artifact

        from ..cache import cache_root, caching_disabled
        from .cpu import CpuTarget
        from .tvm.kernels import PACK
        from .tvm.lower import cache_geometry, packed_params, weight_order

        self.check(options)
        refuse_unsupported(module)
        arch, dtype = self._arch(options), self._dtype(options)
        target = metal_target(arch)
        link = linker()
        timings = {}
        backend = _storage_backend(module, dtype)
        geom = cache_geometry(module)
        geom.dtype = dtype
        layout = {"cache": geom, "packed": sorted(packed_params(module)), "weight_order": weight_order(module),
                  "pack": PACK}
        key = self._cache_key(module, arch, dtype, tvm.__version__)
        cached = os.path.join(options.cache_dir or os.path.join(cache_root(), "kernels"), f"metal-{key}")
        use_cache = not caching_disabled()
        with artifact.staged(out_dir) as stage:  # published only when complete
            os.makedirs(os.path.join(stage, "kernels"))
            t0 = time.perf_counter()
            if use_cache and all(os.path.exists(cached + ext) for ext in (".dylib", ".metal", ".json")):
                shutil.copyfile(cached + ".dylib", os.path.join(stage, LIBRARY))
                shutil.copyfile(cached + ".metal", os.path.join(stage, SOURCE))
                with open(cached + ".json") as f:
                    kernels, functions = json.load(f)
                log.info("kernel cache hit: %s", cached)
            else:
                kernels, functions = self._build(module, dtype, target, link, layout, stage)
                if use_cache:
                    self._store(cached, stage, kernels, functions)
            timings["kernels"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            progress.info("writing weights")
            stored = stored_weights(weights, layout, backend)
            layouts = CpuTarget._write_weights(stage, stored, module, layout)
            timings["weights"] = time.perf_counter() - t0
            tok = CpuTarget._write_tokenizer(stage, tokenizer)
            geom = layout["cache"]
            manifest = {
                "llmc_version": metadata.get("llmc_version"),
                "model": {k: v for k, v in metadata.items() if k != "llmc_version"},
                "target": {"kind": "metal", "arch": arch, "min_macos": MIN_MACOS, "host_triple": HOST_TRIPLE,
                           "tvm_version": tvm.__version__,
                           "arch_note": "apple-m1..m4 get identical kernels (same Metal limits; TVM's MSL "
                                        "has no per-family code); the arch names the host CPU only",
                           "runtime": "TVM's Metal runtime (pip install apache-tvm on macOS arm64 ships "
                                      "libtvm_runtime_metal.dylib)",
                           "verified_on_apple_hardware": False},
                "dtypes": {"activations": dtype, "accumulation": "f32", "logits": "f32",
                           "weights": sorted({w["dtype"] for w in layouts.values()})},
                "kernels": kernels,
                "plan": {
                    "library": LIBRARY,
                    "kernel_source": SOURCE,
                    "msl_functions": functions,
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
                             "k_layout": "[blocks, kv_heads, head_dim, block_size]",
                             "v_layout": "[blocks, block_size, kv_heads, value_dim]"},
                "tokenizer": tok,
            }
            artifact.write_manifest(stage, manifest)
        return timings

    @staticmethod
    def _build(module: Module, dtype: str, target, link, layout: dict, stage: str):
        """Lower, schedule, compile to MSL + host code and link the dylib into ``stage``."""
        import tvm

        from .tvm.gpu_schedule import GpuScheduleError, schedule_gpu_module

        t0 = time.perf_counter()
        progress.info("compiling kernels for Metal (%s, %s activations)", target.host.attrs.get("mcpu"), dtype)
        relax_mod, lowered_layout, _ = lower_for_metal(module, dtype)
        assert lowered_layout["weight_order"] == layout["weight_order"]
        kernels = sorted(g.name_hint for g, f in relax_mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
        try:
            scheduled = schedule_gpu_module(relax_mod, target)
        except GpuScheduleError as exc:
            raise TargetError(f"metal: {exc}") from None
        executable = tvm.compile(scheduled, target=target, relax_pipeline=relax_pipeline(target))
        source = metal_source(executable)
        functions = kernel_functions(kernels, source)
        missing = [k for k, fs in functions.items() if not fs]
        if missing:
            raise TargetError(f"metal: no MSL kernel was emitted for {', '.join(missing)}")
        with open(os.path.join(stage, SOURCE), "w") as f:
            f.write(source)
        executable.export_library(os.path.join(stage, LIBRARY), fcompile=link)
        log.info("compiled %d kernels (%d MSL functions) for Metal and linked %s (%.1fs)", len(kernels),
                 len(msl_functions(source)), LIBRARY, time.perf_counter() - t0)
        return kernels, functions

    @staticmethod
    def _store(cached: str, stage: str, kernels: list, functions: dict) -> None:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(os.path.join(stage, LIBRARY), tmp + ".dylib")
        shutil.copyfile(os.path.join(stage, SOURCE), tmp + ".metal")
        with open(tmp + ".json", "w") as f:
            json.dump([kernels, functions], f)
        for ext in (".metal", ".json", ".dylib"):  # the dylib last: its presence means complete
            os.replace(tmp + ext, cached + ext)

    @staticmethod
    def _cache_key(module: Module, arch: str, dtype: str, tvm_version: str) -> str:
        """Content hash of what determines the kernels: the IR (weights and config excluded), the
        options, and the code generator's own source."""
        from ..ir import print_module
        from . import metal
        from .tvm import gpu_attention, gpu_schedule, kernels, lower

        h = hashlib.sha256()
        text = "\n".join(line for line in print_module(module).splitlines() if "config = " not in line)
        h.update(text.encode())
        h.update(json.dumps(["metal", arch, dtype, tvm_version]).encode())
        for mod in (metal, gpu_attention, gpu_schedule, kernels, lower):
            with open(mod.__file__, "rb") as f:
                h.update(f.read())
        return h.hexdigest()[:32]


def macho_header(path: str) -> Optional[dict]:
    """Magic, CPU type and file type of a 64-bit Mach-O file (None if it is not one)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16 or int.from_bytes(head[:4], "little") != 0xFEEDFACF:
        return None
    return {"magic": 0xFEEDFACF, "cputype": int.from_bytes(head[4:8], "little"),
            "filetype": int.from_bytes(head[12:16], "little")}


MH_DYLIB = 6
CPU_TYPE_ARM64 = 0x0100000C
