"""The metal target on a machine without a Mac or a GPU (what issue 12 asks to show here):

1. structure: a tiny llama compiled with ``--target metal`` is a Mach-O arm64 dylib plus Metal
   Shading Language for every kernel the plan names, and the plan's kernels are the cpu
   target's steps; the runtime refuses it here with a clear message;
2. numerics without a GPU: every scheduled kernel passes TVM's well-formedness, memory and
   GPU-code verification with Metal's limits, and the UNscheduled TIR of the same kernels (the
   metal lowering with fp16 storage, the GPU attention kernels' bodies in serial loops) runs on
   the CPU with LLVM and matches the reference interpreter on a mixed batch of sequences; the
   GPU attention kernel alone matches torch with windows, softcaps, sinks and GQA.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
pytest.importorskip("ziglang", reason="the metal target links with llmc[cross]")

from tvm import relax  # noqa: E402

from llmc.compiler.codegen import CompileOptions, TargetError  # noqa: E402
from llmc.compiler.codegen.cpu import pack_weight  # noqa: E402
from llmc.compiler.codegen.metal import (CPU_TYPE_ARM64, MH_DYLIB, lower_for_metal, macho_header,  # noqa: E402
                                         metal_target, msl_functions, stored_weights)
from llmc.compiler.codegen.tvm.gpu_attention import paged_attention_kernel  # noqa: E402
from llmc.compiler.codegen.tvm.gpu_schedule import schedule_gpu_module, verify_gpu_kernel  # noqa: E402
from llmc.compiler.codegen.tvm.lower import lower_to_relax  # noqa: E402
from llmc.compiler.driver import compile_artifact  # noqa: E402
from llmc.compiler.frontend import ImportedModel, import_hf_model  # noqa: E402
from llmc.compiler.ir import parse_module, print_module  # noqa: E402
from llmc.compiler.passes import PassManager, build_pipeline, get_pass  # noqa: E402
from llmc.compiler.passes.paged_kv import PagedKV  # noqa: E402
from llmc.runtime import ArtifactError, Engine  # noqa: E402
from tests.paged import check_mixed_batches, pool_args  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402


def _copy(imported: ImportedModel) -> ImportedModel:
    return ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)


def optimized(imported: ImportedModel, block_size: int = 16):
    module = parse_module(print_module(imported.module))
    module.attrs["kv_block_size"] = block_size
    return PassManager([get_pass("select-logits")] + list(build_pipeline("metal", 2))).run(module)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, import_hf_model(model)


def test_tiny_llama_metal_artifact_is_a_macho_dylib_with_msl_for_every_kernel(llama, tmp_path, caplog):
    _, imported = llama
    copy = _copy(imported)
    out = tmp_path / "metal"
    compile_artifact(copy, None, "metal", str(out), CompileOptions(max_seq_len=64, cache_dir=str(tmp_path / "c")))
    manifest = json.loads((out / "manifest.json").read_text())
    # a second build of the same model takes the kernels from the cache, identical
    with caplog.at_level("INFO", logger="llmc.codegen"):
        compile_artifact(_copy(imported), None, "metal", str(tmp_path / "again"),
                         CompileOptions(max_seq_len=64, cache_dir=str(tmp_path / "c")))
    assert "kernel cache hit" in caplog.text
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["files"]["kernels/step.dylib"] == manifest["files"]["kernels/step.dylib"]
    assert again["plan"]["msl_functions"] == manifest["plan"]["msl_functions"]
    target = manifest["target"]
    assert (target["kind"], target["arch"], target["min_macos"]) == ("metal", "apple-m1", "13.0")
    assert manifest["dtypes"]["activations"] == "f16" and manifest["kv_cache"]["dtype"] == "f16"
    assert manifest["kv_cache"]["block_size"] == 16
    header = macho_header(str(out / "kernels" / "step.dylib"))
    assert header == {"magic": 0xFEEDFACF, "cputype": CPU_TYPE_ARM64, "filetype": MH_DYLIB}
    source = (out / "kernels" / "step.metal").read_text()
    assert "#include <metal_stdlib>" in source
    names = set(msl_functions(source))
    for kernel in manifest["kernels"]:  # every kernel the plan names has MSL kernel functions
        functions = manifest["plan"]["msl_functions"][kernel]
        assert functions and set(functions) <= names, kernel
    # the plan's kernels are the cpu target's steps (same lowering of the same optimized IR)
    cpu_mod, _ = lower_to_relax(copy.module)
    cpu_kernels = sorted(g.name_hint for g, f in cpu_mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    assert manifest["kernels"] == cpu_kernels
    # fp16 weights in the file, as the kernels read them
    from safetensors.numpy import load_file

    stored = load_file(str(out / "weights.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == np.float16
    # this machine has no Metal: refused with a message naming the problem and the fix
    with pytest.raises(ArtifactError, match="is a metal artifact .*this machine is Linux.*--target cpu"):
        Engine.load(str(out))
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(out), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "metal artifact" in run.stderr and "Traceback" not in run.stderr


def test_bad_arch_and_dtype_are_refused_before_work():
    from llmc.compiler.driver import resolve_target

    target = resolve_target("metal")
    with pytest.raises(TargetError, match="apple-m1, apple-m2, apple-m3, apple-m4"):
        target.check(CompileOptions(arch="sm_90"))
    with pytest.raises(TargetError, match="use f16 .default. or f32"):
        target.check(CompileOptions(dtype="bf16"))
    target.check(CompileOptions(arch="apple-m3", dtype="f32"))


@pytest.mark.parametrize("dtype", ["f16", pytest.param("f32", marks=pytest.mark.slow)])
def test_every_scheduled_kernel_verifies_for_metal(llama, dtype):
    _, imported = llama
    relax_mod, _, _ = lower_for_metal(optimized(imported), dtype)
    target = metal_target()
    scheduled = schedule_gpu_module(relax_mod, target)
    checked = 0
    for gvar, func in scheduled.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert verify_gpu_kernel(func, target) >= 1, gvar.name_hint
            checked += 1
    assert checked == sum(isinstance(f, tvm.tirx.PrimFunc) for f in relax_mod.functions.values())


def test_verification_rejects_a_kernel_over_metals_threadgroup_memory():
    from tvm.script import tirx as T

    from llmc.compiler.codegen.tvm.gpu_schedule import GpuScheduleError

    @T.prim_func(private=True, check_well_formed=False)
    def big(a: T.Buffer((16384,), "float32"), b: T.Buffer((16384,), "float32")):
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            for tx in T.thread_binding(256, thread="threadIdx.x"):
                with T.sblock("s"):
                    T.reads(a[0:16384])
                    T.writes(b[0:16384])
                    tile = T.alloc_buffer((16384,), "float32", scope="shared")  # 64 KiB > 32 KiB
                    for i in range(64):
                        tile[i * 256 + tx] = a[i * 256 + tx]
                    for i in range(64):
                        b[i * 256 + tx] = tile[i * 256 + tx]

    with pytest.raises(GpuScheduleError, match="exceeds the GPU limits"):
        verify_gpu_kernel(big, metal_target())


def _cpu_step(module, imported, dtype):
    """The metal lowering, unscheduled, compiled for the CPU: a run function for tests/paged.py
    that keeps its own fp16/fp32 pools."""
    relax_mod, layout, backend = lower_for_metal(module, dtype, gpu=False)
    ex = tvm.compile(relax_mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    arrays = stored_weights(imported.weights, layout, backend)
    packed = set(layout["packed"])
    weights = [tvm.runtime.tensor(pack_weight(a, layout["pack"]) if n in packed else a) for n, a in arrays.items()]
    geom = layout["cache"]
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    pools = []
    for _ in range(geom.layers):
        pools.append(tvm.runtime.tensor(np.zeros(geom.shape(64), np_dtype)))
        pools.append(tvm.runtime.tensor(np.zeros(geom.shape(64, value=True), np_dtype)))
    n_pools = len(pool_args(module))

    def run(inputs):
        args = [tvm.runtime.tensor(inputs[k].numpy().astype(np.int64)) for k in (
            "input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index")]
        fn = vm["decode"] if len(inputs["input_ids"]) == 1 and len(inputs["seq_lens"]) == 1 else vm["prefill"]
        logits = torch.from_numpy(fn(*args, *pools, *weights).numpy().astype(np.float32))
        return [logits] + [inputs[a.name] for a in pool_args(module)][:n_pools]

    return run


@pytest.mark.parametrize("arch,dtype,atol", [pytest.param("llama", "f32", 1e-4, marks=pytest.mark.slow),
                                             ("llama", "f16", 3e-2),
                                             pytest.param("gemma2", "f16", 3e-2, marks=pytest.mark.slow)])
def test_unscheduled_metal_kernels_on_cpu_match_the_interpreter(arch, dtype, atol):
    model = llama_model = tiny_model(arch)
    imported = import_hf_model(llama_model)
    before = parse_module(print_module(imported.module))
    get_pass("select-logits").run(before)
    paged = parse_module(print_module(before))
    PagedKV(16).run(paged)
    run = _cpu_step(optimized(imported), imported, dtype)
    worst = check_mixed_batches(before, paged, imported.weights, model.config.vocab_size, atol=atol, run=run,
                                num_blocks=64)
    assert worst <= atol


def _reference_attention(q, kp, vp, tables, lens, starts, scale, window, softcap, sinks):
    t, hq, d = q.shape
    hkv = kp.shape[1]
    g = hq // hkv
    bs = kp.shape[3]
    out = torch.zeros(t, hq, vp.shape[3], dtype=torch.float64)
    for b in range(len(lens)):
        n = int(starts[b + 1] - starts[b])
        length = int(lens[b])
        blocks = tables[b, :-(-length // bs)]
        k = kp[blocks].permute(0, 3, 1, 2).reshape(-1, hkv, d)[:length].double()   # [S, hkv, d]
        v = vp[blocks].reshape(-1, hkv, vp.shape[3])[:length].double()
        for i in range(n):
            p = length - n + i
            row = int(starts[b]) + i
            for h in range(hq):
                s = (k[:, h // g] @ q[row, h].double())
                s = softcap * torch.tanh(s * scale / softcap) if softcap else s * scale
                j = torch.arange(length)
                mask = (j <= p) & ((p - j < window) if window else True)
                s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=torch.float64))
                if sinks is not None:
                    s = torch.cat([s, sinks[h:h + 1].double()])
                w = torch.softmax(s, 0)[:length]
                out[row, h] = w @ v[:, h // g]
    return out


@pytest.mark.parametrize("rows,lanes", [(2, 1), (1, 4)])  # tiles of 2 rows; one row split over 4 lanes
@pytest.mark.parametrize("window,softcap,sinks,dtype", [(0, 0.0, False, "float32"), (5, 30.0, True, "float32"),
                                                        (0, 0.0, False, "float16"), (7, 0.0, True, "float16")])
def test_gpu_attention_kernel_body_matches_torch(window, softcap, sinks, dtype, rows, lanes):
    hq, hkv, d, dv, bs, nb = 6, 2, 16, 8, 4, 24
    g = torch.Generator().manual_seed(window + int(softcap))
    lens, news = [11, 1, 6], [4, 1, 6]  # a prefill chunk after 7 cached, a decode token, a whole prompt
    perm = torch.randperm(nb, generator=g)
    tables = torch.zeros(3, 4, dtype=torch.int64)
    used = 0
    for b, length in enumerate(lens):
        k = -(-length // bs)
        tables[b, :k] = perm[used:used + k]
        used += k
    starts = torch.tensor([0, 4, 5, 11])
    t = int(starts[-1]) + 2  # two rows no sequence owns: must come out zero
    q = torch.randn(t, hq, d, generator=g)
    kp = torch.randn(nb, hkv, d, bs, generator=g)
    vp = torch.randn(nb, bs, hkv, dv, generator=g)
    sk = torch.randn(hq, generator=g) if sinks else None
    kernel = paged_attention_kernel(hq, hkv, d, dv, bs, 0.25, window, softcap, rows, sinks, dtype, "float32",
                                    dtype, gpu=False, lanes=lanes).with_attr("global_symbol", "main")
    lib = tvm.compile(kernel, target=tvm.target.Target({"kind": "llvm"}))
    npd = np.float16 if dtype == "float16" else np.float32
    qn, kn, vn = (x.numpy().astype(npd) for x in (q, kp, vp))
    args = [tvm.runtime.tensor(a) for a in (qn, kn, vn, tables.numpy(), np.array(lens), starts.numpy())]
    if sinks:
        args.append(tvm.runtime.tensor(sk.numpy()))
    out = tvm.runtime.tensor(np.full((t, hq, dv), 7.0, npd))
    lib["main"](*args, out)
    want = _reference_attention(torch.from_numpy(qn.astype(np.float32)), torch.from_numpy(kn.astype(np.float32)),
                                torch.from_numpy(vn.astype(np.float32)), tables, lens, starts, 0.25, window,
                                softcap, sk)
    tol = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float64), want.numpy(), atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_metal_artifact(tmp_path):
    """`llmc compile smollm2 --target metal` on this Linux machine: a Mach-O arm64 dylib, MSL for
    every kernel the plan names, the cpu artifact's kernel list."""
    from tests.conftest import require_bundled_model

    require_bundled_model()
    out = tmp_path / "smollm2-metal"
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", "smollm2", "--target", "metal", "-o",
                          str(out)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "metal" and manifest["model"]["quant"] == "gguf"  # Q4_1/Q8_0 kept
    assert macho_header(str(out / "kernels" / "step.dylib"))["cputype"] == CPU_TYPE_ARM64
    names = set(msl_functions((out / "kernels" / "step.metal").read_text()))
    assert all(set(manifest["plan"]["msl_functions"][k]) <= names and manifest["plan"]["msl_functions"][k]
               for k in manifest["kernels"])
    # the cpu target's portable path (a baseline AArch64 build, no dotprod): on x86-64 with AVX2
    # and AArch64 with dotprod the cpu target swaps 4-bit linears for its integer-dot-product
    # kernels (tvm/intdot.py), a CPU-only choice
    cpu = tmp_path / "smollm2-cpu"
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", "smollm2", "--target", "cpu", "--mcpu",
                          "aarch64", "-o", str(cpu)], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    # the same steps: every op kind the cpu plan calls, and nothing else (metal may specialize
    # one more variant: its decode attention kernel splits keys over lanes, a different
    # PrimFunc from the prefill one, where the cpu target's two coincide for SmolLM2)
    def steps(kernels):
        return sorted({re.sub(r"\d+$", "", k) for k in kernels})

    cpu_kernels = json.loads((cpu / "manifest.json").read_text())["kernels"]
    assert steps(cpu_kernels) == steps(manifest["kernels"])
    assert set(cpu_kernels) <= set(manifest["kernels"]) and len(manifest["kernels"]) - len(cpu_kernels) <= 1


@pytest.mark.slow
def test_quantized_kernels_schedule_and_verify_for_metal(llama, tmp_path):
    """quantized_linear / quantized_embedding (codes dequantized in registers) on metal."""
    _, imported = llama
    copy = _copy(imported)
    compile_artifact(copy, None, "metal", str(tmp_path / "q4"), CompileOptions(max_seq_len=64), quant="q4a_g32")
    manifest = json.loads((tmp_path / "q4" / "manifest.json").read_text())
    assert any(k.startswith("quantized_linear") for k in manifest["kernels"])
    relax_mod, _, _ = lower_for_metal(copy.module, "f16")
    target = metal_target()
    for gvar, func in schedule_gpu_module(relax_mod, target).functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert verify_gpu_kernel(func, target) >= 1, gvar.name_hint


@pytest.mark.slow
def test_cuda_check_bundle_is_emitted(tmp_path):
    """benchmarks/metal_cuda_check.py emit: the scheduled kernels as CUDA C with launch shapes,
    inputs and the CPU reference (its `run` half needs an NVIDIA GPU and CuPy)."""
    out = tmp_path / "bundle"
    run = subprocess.run([sys.executable, "benchmarks/metal_cuda_check.py", "emit", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    names = [k["name"] for k in index["kernels"]]
    assert len(names) >= 30 and "paged_attention_case1" in names
    assert any(n.startswith("prefill40_") and "linear" in n for n in names)  # tiled GEMMs
    for k in index["kernels"]:
        source = (out / f"{k['name']}.cu").read_text()
        assert f"{k['function']}(" in source and "__global__" in source
        assert np.prod(k["block"]) <= 1024


@pytest.mark.parametrize("model_type, named", [("lfm2", "recurrent state .*causal_conv1d.*--target cpu"),
                                                ("bloom", "no ALiBi .*--target cpu"),
                                                ("llama4_text", "no chunked attention .*chunk=.*--target cpu")])
def test_what_metal_cannot_compute_is_refused_by_name(model_type, named, tmp_path):
    """Recurrent state, ALiBi and chunked attention have cpu kernels only: the metal target names
    the construct before building anything, and writes nothing."""
    from llmc.compiler.driver import resolve_target
    from tests.frontend.arch_sweep import tiny_model as sweep_model

    imported = import_hf_model(sweep_model(model_type))
    with pytest.raises(TargetError, match=named):
        resolve_target("metal").compile(imported.module, imported.weights, str(tmp_path / "art"),
                                        CompileOptions(max_seq_len=128), {})
    assert not (tmp_path / "art").exists()
