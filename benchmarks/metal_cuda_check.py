"""Numerics of the metal target's GPU schedules on an NVIDIA GPU (no Mac needed).

The metal schedules (compiler/codegen/tvm/gpu_schedule.py) are plain TIR thread/block
bindings, so TVM emits the same scheduled kernels as CUDA C. Two steps, because apache-tvm
does not travel to the lent GPU machine:

    # here (TVM installed, no GPU): schedule the tiny llama's kernels for a CUDA target with
    # Metal's limits, write each kernel's CUDA source, launch shape, random inputs and the
    # outputs of the UNscheduled TIR run on the CPU (LLVM)
    python benchmarks/metal_cuda_check.py emit --out build/metal_cuda

    # on the GPU machine (nvcc + CuPy, no TVM): compile each source, launch it, compare
    python benchmarks/metal_cuda_check.py run --bundle build/metal_cuda

Covered: the decode entry point's kernels (GEMV with its epilogue, RMSNorm and other
reductions, elementwise, rope, embedding), the same step lowered for a static 40 tokens of 3
sequences (its linears take the shared-memory tiled GEMM), and the paged-attention kernel on
a mixed batch with and without window/softcap/sinks. Kernels that lower to several device
kernels are listed as skipped in the bundle's index. Exit status 1 if any kernel differs
beyond its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

CUDA_TARGET = {"kind": "cuda", "arch": "sm_80", "max_threads_per_block": 1024, "max_shared_memory_per_block": 32768,
               "thread_warp_size": 32, "max_num_threads": 1024}


def _buffers(func):
    """(name, shape, dtype) of every parameter buffer of a static-shape PrimFunc."""
    out = []
    text = func.script()
    for name, shape, dtype in re.findall(r"(\w+): T\.Buffer\(\((.*?)\),\s*\"(\w+)\"\)", text):
        dims = [int(re.sub(r"T\.int64\((\d+)\)", r"\1", d).strip()) for d in shape.split(",") if d.strip()]
        out.append((name, dims, dtype))
    return out


def emit(out_dir: str, dtype: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tvm

    from llmc.compiler.codegen.metal import lower_for_metal
    from llmc.compiler.codegen.tvm.gpu_schedule import _called_only_by, lower_for_verification, schedule_gpu_primfunc
    from llmc.compiler.frontend import import_hf_model
    from llmc.compiler.passes import PassManager, build_pipeline, get_pass
    from tests.tiny_models import tiny_model

    imported = import_hf_model(tiny_model("llama"))
    imported.module.attrs["kv_block_size"] = 16
    module = PassManager([get_pass("select-logits")] + list(build_pipeline("metal", 2))).run(imported.module)
    relax_mod, _, _ = lower_for_metal(module, dtype)
    target = tvm.target.Target(CUDA_TARGET, host={"kind": "llvm"})
    decode_only = _called_only_by(relax_mod, "decode")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    index = {"kernels": [], "skipped": {}}
    work = [(g.name_hint, f, True) for g, f in relax_mod.functions.items() if g.name_hint in decode_only]
    work += [("prefill40_" + g.name_hint, f, False) for g, f in _static_prefill(module, dtype).functions.items()]
    for name, func, decode in work:
        if not isinstance(func, tvm.tirx.PrimFunc) or "llmc.kind" in (func.attrs or {}):
            continue
        try:
            buffers = _buffers(func)
            scheduled = schedule_gpu_primfunc(func, decode, target, name)
            lowered = lower_for_verification(scheduled, target)
        except Exception as exc:
            index["skipped"][name] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        devices = [(g.name_hint, f) for g, f in lowered.functions.items() if int((f.attrs or {}).get("calling_conv", 0)) == 2]
        if len(devices) != 1:
            index["skipped"][name] = f"{len(devices)} device kernels"
            continue
        kname, kfunc = devices[0]
        params = []
        for p in kfunc.params:
            if not str(p.name).endswith("_ptr"):
                break
            params.append(str(p.name)[:-4])
        if len(params) != len(kfunc.params) or set(params) - {b[0] for b in buffers}:
            index["skipped"][name] = "device kernel takes scalars or intermediate buffers"
            continue
        script = kfunc.script()
        launch = {axis: int(n) for axis, n in re.findall(r'launch_thread\("(\w+\.\w)", (?:T\.int64\()?(\d+)', script)}
        grid = [launch.get(f"blockIdx.{a}", 1) for a in "xyz"]
        block = [launch.get(f"threadIdx.{a}", 1) for a in "xyz"]
        inputs = {}
        for bname, shape, bdtype in buffers:
            if bdtype.startswith("int") or bdtype.startswith("uint"):
                inputs[bname] = np.zeros(shape, dtype=bdtype)
            else:
                inputs[bname] = rng.standard_normal(shape).astype(bdtype)
        cpu = tvm.compile(func.with_attr("global_symbol", "main"), target=tvm.target.Target({"kind": "llvm"}))
        tensors = {k: tvm.runtime.tensor(v) for k, v in inputs.items()}
        cpu["main"](*[tensors[b[0]] for b in buffers])
        expected = {k: t.numpy() for k, t in tensors.items()}
        cuda = tvm.compile(scheduled.with_attr("global_symbol", "main"), target=target)
        source = [m for m in _walk(cuda.mod) if m.kind == "cuda"][0].inspect_source()
        with open(os.path.join(out_dir, f"{name}.cu"), "w") as f:
            f.write(source)
        np.savez(os.path.join(out_dir, f"{name}.inputs.npz"), **inputs)
        np.savez(os.path.join(out_dir, f"{name}.expected.npz"), **expected)
        index["kernels"].append({"name": name, "function": kname, "grid": grid, "block": block,
                                 "args": [{"buffer": p} for p in params], "outputs": [buffers[-1][0]],
                                 "dtype": dtype})
    _attention_cases(out_dir, dtype, target, index)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"wrote {len(index['kernels'])} kernels to {out_dir} ({len(index['skipped'])} skipped)")


def _static_prefill(module, dtype: str):
    """The step lowered for a static 40 tokens of 3 sequences: its linears take the tiled GEMM
    schedule (more than GEMV_MAX_ROWS rows) with static shapes, so they can be launched here."""
    from tvm import relax

    from llmc.compiler.codegen.metal import _storage_backend
    from llmc.compiler.codegen.tvm.lower import AttentionOptions, cache_geometry, lower_function, packed_params, \
        weight_order

    geom = cache_geometry(module)
    geom.dtype = dtype
    bb = relax.BlockBuilder()
    lower_function(bb, module, "prefill40", geom, packed_params(module), weight_order(module), 40, 3,
                   AttentionOptions(), _storage_backend(module, dtype))
    return bb.get()


def _attention_cases(out_dir: str, dtype: str, target, index: dict) -> None:
    """The GPU paged-attention kernel on a mixed batch (a chunk after cached tokens, a decode
    token, a whole prompt; shuffled blocks), with and without window/softcap/sinks; expected:
    the same kernel body in serial loops on the CPU."""
    import tvm

    from llmc.compiler.codegen.tvm.gpu_attention import paged_attention_kernel

    tdtype = {"f16": "float16", "f32": "float32"}[dtype]
    hq, hkv, d, dv, bs, nb, rows = 6, 2, 16, 8, 4, 24, 2
    for case, (window, softcap, sinks) in enumerate([(0, 0.0, False), (5, 30.0, True)]):
        rng = np.random.default_rng(case)
        lens, starts = np.array([11, 1, 6]), np.array([0, 4, 5, 11])
        perm = rng.permutation(nb)
        tables = np.zeros((3, 4), dtype=np.int64)
        used = 0
        for b, length in enumerate(lens):
            k = -(-length // bs)
            tables[b, :k] = perm[used:used + k]
            used += k
        t = int(starts[-1]) + 2
        inputs = {"q": rng.standard_normal((t, hq, d)).astype(tdtype),
                  "kp": rng.standard_normal((nb, hkv, d, bs)).astype(tdtype),
                  "vp": rng.standard_normal((nb, bs, hkv, dv)).astype(tdtype),
                  "tables": tables, "lens": lens.astype(np.int64), "starts": starts.astype(np.int64)}
        order = ["q", "kp", "vp", "tables", "lens", "starts"]
        if sinks:
            inputs["sk"] = rng.standard_normal(hq).astype(np.float32)
            order.append("sk")
        inputs["out"] = np.full((t, hq, dv), 7.0, tdtype)
        order.append("out")
        name = f"paged_attention_case{case}"
        serial = paged_attention_kernel(hq, hkv, d, dv, bs, 0.25, window, softcap, rows, sinks, tdtype, "float32",
                                        tdtype, gpu=False).with_attr("global_symbol", "main")
        cpu = tvm.compile(serial, target=tvm.target.Target({"kind": "llvm"}))
        tensors = {k: tvm.runtime.tensor(v) for k, v in inputs.items()}
        cpu["main"](*[tensors[k] for k in order])
        gpu = paged_attention_kernel(hq, hkv, d, dv, bs, 0.25, window, softcap, rows, sinks, tdtype, "float32",
                                     tdtype).with_attr("global_symbol", "main")
        cuda = tvm.compile(gpu, target=target)
        source = [m for m in _walk(cuda.mod) if m.kind == "cuda"][0].inspect_source()
        with open(os.path.join(out_dir, f"{name}.cu"), "w") as f:
            f.write(source)
        np.savez(os.path.join(out_dir, f"{name}.inputs.npz"), **inputs)
        np.savez(os.path.join(out_dir, f"{name}.expected.npz"), out=tensors["out"].numpy())
        scalars = {"b": 3, "mb": 4, "t": t, "nb": nb}
        from llmc.compiler.codegen.tvm.gpu_schedule import lower_for_verification

        device = [f for g, f in lower_for_verification(gpu, target).functions.items()
                  if int((f.attrs or {}).get("calling_conv", 0)) == 2][0]
        args = []
        for p in device.params:  # the device kernel's own parameter order
            pname = str(p.name)
            args.append({"buffer": pname[:-4]} if pname.endswith("_ptr") else {"scalar": scalars[pname], "dtype": "int64"})
        g = hq // hkv
        index["kernels"].append({"name": name, "function": "main_kernel", "grid": [((t + rows - 1) // rows + 3) * hkv, 1, 1],
                                 "block": [rows * g, 1, 1], "args": args, "outputs": ["out"], "dtype": dtype})


def _walk(mod):
    yield mod
    for child in mod.imports:
        yield from _walk(child)


def run(bundle: str) -> int:
    import cupy as cp

    with open(os.path.join(bundle, "index.json")) as f:
        index = json.load(f)
    failures = 0
    for k in index["kernels"]:
        with open(os.path.join(bundle, f"{k['name']}.cu")) as f:
            source = f.read()
        module = cp.RawModule(code=source, backend="nvcc", options=("-std=c++17",))
        kernel = module.get_function(k["function"])
        inputs = dict(np.load(os.path.join(bundle, f"{k['name']}.inputs.npz")))
        expected = dict(np.load(os.path.join(bundle, f"{k['name']}.expected.npz")))
        device = {name: cp.asarray(a) for name, a in inputs.items()}
        args = tuple(device[a["buffer"]] if "buffer" in a else np.int64(a["scalar"]) for a in k["args"])
        kernel(tuple(k["grid"]), tuple(k["block"]), args)
        cp.cuda.Device().synchronize()
        tol = 2e-2 if k["dtype"] == "f16" else 1e-4
        for out in k["outputs"]:
            got = cp.asnumpy(device[out]).astype(np.float64)
            want = expected[out].astype(np.float64)
            err = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
            ok = err <= tol
            failures += not ok
            print(f"{k['name']:32s} {out:24s} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    print(f"{len(index['kernels'])} kernels, {failures} failures; skipped: {', '.join(index['skipped']) or 'none'}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("emit", help="schedule, emit CUDA and the CPU reference (needs TVM)")
    e.add_argument("--out", default="build/metal_cuda")
    e.add_argument("--dtype", default="f16", choices=("f16", "f32"))
    r = sub.add_parser("run", help="compile with nvcc through CuPy, launch, compare (needs a GPU)")
    r.add_argument("--bundle", default="build/metal_cuda")
    args = parser.parse_args()
    if args.command == "emit":
        emit(args.out, args.dtype)
        return 0
    return run(args.bundle)


if __name__ == "__main__":
    sys.exit(main())
