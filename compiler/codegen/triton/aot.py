"""Ahead-of-time compilation of rendered kernels with ``triton.compile`` for a GPUTarget.

No GPU is needed: Triton lowers to PTX and runs the ptxas it bundles (cuda), or to AMDGCN and
links an hsaco code object (rocm). Compilation runs in worker processes started with
TRITON_INTERPRET=0, because Triton fixes at its first import whether its library functions
are interpreted (a test process running kernels under the interpreter cannot also compile).

Each compiled kernel is cached by (kernel name — a hash of source, signature and launch
options —, arch, Triton version) under ``<llmc cache>/triton-aot`` and Triton's own cache is
kept in ``<llmc cache>/triton``.

Run as ``python -m llmc.compiler.codegen.triton.aot JOBS.json`` (what the driver does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from ...cache import cache_root, caching_disabled
from .kernels import Kernel

CUDA_ARCHS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}
ROCM_ARCHS = {"gfx90a": 64, "gfx942": 64, "gfx1100": 32}  # arch -> wavefront size
BINARY = {"cuda": ("cubin", "ptx"), "rocm": ("hsaco", "amdgcn")}


class AotError(RuntimeError):
    pass


def gpu_target(kind: str, arch: str):
    from triton.backends.compiler import GPUTarget

    if kind == "cuda":
        return GPUTarget("cuda", CUDA_ARCHS[arch], 32)
    return GPUTarget("hip", arch, ROCM_ARCHS[arch])


def triton_version() -> str:
    from importlib.metadata import version

    try:
        return version("triton")
    except Exception:
        return "unknown"


def _compile_one(job: dict, kind: str, arch: str, out_dir: str) -> dict:
    """Compile one kernel; write NAME.<binary> and NAME.<asm>; return its launch metadata."""
    import importlib.util

    import triton
    from triton.compiler import ASTSource

    name = job["name"]
    spec = importlib.util.spec_from_file_location(f"llmc_aot_{name}", job["source"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, name)
    signature = dict(job["params"])
    src = ASTSource(fn=fn, signature=signature, constexprs={})
    compiled = triton.compile(src, target=gpu_target(kind, arch),
                              options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    binary, asm = BINARY[kind]
    with open(os.path.join(out_dir, f"{name}.{binary}"), "wb") as f:
        f.write(compiled.asm[binary])
    with open(os.path.join(out_dir, f"{name}.{asm}"), "w") as f:
        f.write(compiled.asm[asm])
    md = compiled.metadata
    return {"name": name, "symbol": md.name, "params": job["params"], "num_warps": md.num_warps,
            "num_stages": md.num_stages, "shared": md.shared, "warp_size": getattr(md, "warp_size", None),
            "global_scratch_size": md.global_scratch_size, "global_scratch_align": md.global_scratch_align,
            "profile_scratch_size": md.profile_scratch_size, "profile_scratch_align": md.profile_scratch_align,
            "num_ctas": getattr(md, "num_ctas", 1), "binary": f"{name}.{binary}", "asm": f"{name}.{asm}"}


def worker_main(jobs_path: str) -> None:
    with open(jobs_path) as f:
        spec = json.load(f)
    results = []
    for job in spec["jobs"]:
        results.append(_compile_one(job, spec["kind"], spec["arch"], spec["out_dir"]))
    with open(jobs_path + ".out", "w") as f:
        json.dump(results, f)


def _cache_dir(kind: str, arch: str) -> str:
    return os.path.join(cache_root(), "triton-aot", f"{kind}-{arch}-triton{triton_version()}")


def compile_kernels(kernels: list[Kernel], kind: str, arch: str, out_dir: str, src_dir: str,
                    workers: Optional[int] = None) -> dict[str, dict]:
    """Compile every kernel for (kind, arch) into ``out_dir``; sources are read from
    ``src_dir/NAME.py``. Returns {name: launch metadata}. Cached kernels are copied."""
    if kind == "cuda" and arch not in CUDA_ARCHS:
        raise AotError(f"unknown CUDA arch '{arch}'; use one of {', '.join(CUDA_ARCHS)}")
    if kind == "rocm" and arch not in ROCM_ARCHS:
        raise AotError(f"unknown ROCm arch '{arch}'; use one of {', '.join(ROCM_ARCHS)}")
    os.makedirs(out_dir, exist_ok=True)
    binary, asm = BINARY[kind]
    use_cache = not caching_disabled()
    cache = _cache_dir(kind, arch)
    meta: dict[str, dict] = {}
    todo = []
    for k in kernels:
        cached = os.path.join(cache, f"{k.name}.json")
        if use_cache and os.path.exists(cached):
            with open(cached) as f:
                meta[k.name] = json.load(f)
            for ext in (binary, asm):
                shutil.copyfile(os.path.join(cache, f"{k.name}.{ext}"), os.path.join(out_dir, f"{k.name}.{ext}"))
        else:
            todo.append({"name": k.name, "source": os.path.join(src_dir, f"{k.name}.py"), "params": k.params,
                         "num_warps": k.num_warps, "num_stages": k.num_stages})
    if todo:
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_CACHE_DIR", os.path.join(cache_root(), "triton"))
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        with tempfile.TemporaryDirectory(prefix="llmc-aot-") as tmp:
            procs = []
            for w in range(workers):
                path = os.path.join(tmp, f"jobs{w}.json")
                with open(path, "w") as f:
                    json.dump({"kind": kind, "arch": arch, "out_dir": out_dir, "jobs": todo[w::workers]}, f)
                procs.append((path, subprocess.Popen([sys.executable, "-m", __name__, path], env=env,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            for path, p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    tail = "\n".join(err.strip().splitlines()[-15:])
                    raise AotError(f"triton.compile failed for {kind} {arch}:\n{tail}")
                with open(path + ".out") as f:
                    for m in json.load(f):
                        meta[m["name"]] = m
        if use_cache:
            os.makedirs(cache, exist_ok=True)
            for job in todo:
                name = job["name"]
                for ext in (binary, asm):
                    shutil.copyfile(os.path.join(out_dir, f"{name}.{ext}"), os.path.join(cache, f"{name}.{ext}"))
                tmp_json = os.path.join(cache, f"{name}.json.{os.getpid()}")
                with open(tmp_json, "w") as f:
                    json.dump(meta[name], f)
                os.replace(tmp_json, os.path.join(cache, f"{name}.json"))
    return meta


if __name__ == "__main__":
    worker_main(sys.argv[1])
