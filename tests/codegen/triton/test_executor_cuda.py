"""The CUDA executor's checks that need no GPU: the manifest's kernel table is parsed and
validated against the cubins themselves, an artifact for another arch is refused with the
command that fixes it, arguments are packed in the kernel's order and types, and the module
imports and fails clearly without cuda-bindings. (The launches themselves need a GPU.)"""

import copy
import ctypes

import pytest

from llmc.runtime.artifact import ArtifactError, Manifest, read_manifest
from llmc.runtime.executor_cuda import CudaExecutor, KernelSpec, check_device_arch, pack_args, parse_kernels


def test_kernel_table_parses(gpu_artifact):
    manifest = read_manifest(gpu_artifact("cuda", "sm_90", "f16"))
    specs = parse_kernels(manifest)
    assert set(specs) == set(manifest.data["kernels"])
    gemm = next(s for s in specs.values() if s.name.startswith("linear_gemm_"))
    assert gemm.params[0] == ("x_ptr", "*fp16") and gemm.params[-2:] == [("T", "i32"), ("B", "i32")]
    assert gemm.threads == 32 * gemm.num_warps and gemm.symbol == gemm.name


def _edited(manifest, edit):
    data = copy.deepcopy(manifest.data)
    edit(data)
    return Manifest(manifest.root, data)


def test_inconsistent_kernel_tables_are_refused(gpu_artifact):
    manifest = read_manifest(gpu_artifact("cuda", "sm_90", "f16"))
    names = sorted(manifest.data["kernels"])

    def wrong_arch(d):
        d["target"]["arch"] = "sm_80"

    def wrong_symbol(d):
        d["kernels"][names[0]]["symbol"] = names[1]

    def missing_field(d):
        del d["kernels"][names[0]]["num_warps"]

    def bad_type(d):
        d["kernels"][names[0]]["params"][0][1] = "tensordesc"

    for edit, message in ((wrong_arch, "built for sm_90, but the manifest says sm_80"),
                          (wrong_symbol, "is not defined in"), (missing_field, "incomplete launch metadata"),
                          (bad_type, "cannot pass")):
        with pytest.raises(ArtifactError, match=message):
            parse_kernels(_edited(manifest, edit))


def test_another_arch_is_refused_with_the_fix():
    with pytest.raises(ArtifactError, match=r"compiled for sm_80, but NVIDIA H200 is sm_90.*--arch sm_90"):
        check_device_arch("sm_80", "sm_90", "NVIDIA H200")
    with pytest.raises(ArtifactError, match="--arch sm_100"):
        check_device_arch("sm_90", "sm_100")
    with pytest.raises(ArtifactError, match="--arch sm_80"):
        check_device_arch("sm_89", "sm_80")
    check_device_arch("sm_80", "sm_86")  # same major, later minor: cubins are compatible
    check_device_arch("sm_90", "sm_90")


class FakeTensor:
    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr


def test_arguments_are_packed_in_kernel_order():
    spec = KernelSpec("k", "k", "k.cubin", [("x", "*bf16"), ("o", "*fp32"), ("T", "i32"), ("n", "i64")], 4, 0, 0, 0)
    values, pointers = pack_args(spec, [FakeTensor(0x1000), FakeTensor(0x2000), 7, 1 << 40], scratch=(0, 0x3000))
    assert [type(v) for v in values] == [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64,
                                         ctypes.c_uint64, ctypes.c_uint64]
    assert [v.value for v in values] == [0x1000, 0x2000, 7, 1 << 40, 0, 0x3000]
    assert len(pointers) == 6 and all(int(p) == ctypes.addressof(v) for p, v in zip(pointers, values))
    with pytest.raises(ValueError, match="takes 4 arguments, got 3"):
        pack_args(spec, [FakeTensor(1), FakeTensor(2), 3])


def test_without_cuda_bindings_the_error_says_what_to_install(gpu_artifact, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(ArtifactError, match=r"pip install 'llmc\[cuda\]'"):
        CudaExecutor(read_manifest(gpu_artifact("cuda", "sm_90", "f16")))


def test_engine_refuses_rocm_artifacts_with_the_workaround(gpu_artifact, monkeypatch):
    from llmc.runtime import Engine

    monkeypatch.delenv("LLMC_GPU_EXECUTOR", raising=False)
    with pytest.raises(ArtifactError, match="LLMC_GPU_EXECUTOR=triton"):
        Engine.load(gpu_artifact("rocm", "gfx942"))


def test_cuda_executor_module_imports_nothing_heavy():
    """Importing it needs neither cuda-bindings nor torch, triton or the compiler (all lazy)."""
    import subprocess
    import sys

    code = ("import sys, llmc.runtime.executor_cuda; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'cuda', 'transformers') "
            "or m.startswith('llmc.compiler')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
