"""Ahead-of-time builds with no GPU: `--target cuda --arch sm_90|sm_80` and `--target rocm
--arch gfx942` compile every kernel with triton.compile; every cubin must be a CUDA ELF for that
SM holding the kernel the manifest names, every hsaco an AMDGPU code object for that gfx; the
artifact's plan, sources and bf16 weights reproduce the reference logits (run by the Triton
runner under the interpreter)."""

import json
import os

import pytest

pytest.importorskip("triton")

from llmc.compiler.codegen import CompileOptions  # noqa: E402
from llmc.compiler.driver import compile_artifact  # noqa: E402
from llmc.compiler.frontend import ImportedModel, import_hf_model  # noqa: E402
from llmc.compiler.ir import parse_module, print_module  # noqa: E402
from llmc.runtime.artifact import read_manifest  # noqa: E402
from llmc.runtime.gpu_binary import EM_AMDGPU, EM_CUDA, read_elf  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

# The default run builds two artifacts: sm_90 in f16 (which the interpreter can also run, see
# test_artifact_plan_and_weights_reproduce_the_reference) and gfx942 in the default bf16.
ARCHS = [("cuda", "sm_90", "f16"), ("rocm", "gfx942", None),
         pytest.param("cuda", "sm_90", None, marks=pytest.mark.slow),
         pytest.param("cuda", "sm_80", None, marks=pytest.mark.slow),
         pytest.param("rocm", "gfx1100", None, marks=pytest.mark.slow)]


def compile_gpu(imported, out_dir, kind, arch, dtype=None):
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    return compile_artifact(copy, None, kind, str(out_dir), CompileOptions(arch=arch, dtype=dtype, max_seq_len=128))


@pytest.fixture(scope="module")
def tiny_llama():
    return import_hf_model(tiny_model("llama"))


def check_binaries(root: str, kind: str, arch: str) -> int:
    manifest = read_manifest(root)
    target = manifest.target
    assert (target["kind"], target["arch"]) == (kind, arch)
    assert target["toolchain"]["triton"] == target["triton_version"]
    kernels = manifest.data["kernels"]
    launched = {e["kernel"] for e in manifest.data["plan"]["launches"]}
    assert launched == set(kernels)
    for name, meta in kernels.items():
        with open(os.path.join(root, manifest.data["kernel_dir"], meta["binary"]), "rb") as f:
            elf = read_elf(f.read())
        assert elf.machine == (EM_CUDA if kind == "cuda" else EM_AMDGPU), name
        assert elf.arch == arch, f"{name}: built for {elf.arch}, not {arch}"
        assert meta["symbol"] == name and name in elf.symbols
        assert os.path.exists(os.path.join(root, "kernels", "src", f"{name}.py"))
        with open(os.path.join(root, manifest.data["kernel_dir"], meta["asm"])) as f:
            asm = f.read()
        if kind == "cuda":
            assert f".target {arch}" in asm and f".entry {name}" in asm
        else:
            target_line = next(line for line in asm.splitlines() if ".amdgcn_target" in line)
            assert target_line.rstrip().rstrip('"').endswith(arch) and f"{name}:" in asm
        assert meta["num_warps"] >= 1 and meta["shared"] >= 0 and meta["params"]
    return len(kernels)


@pytest.mark.parametrize("kind,arch,dtype", ARCHS)
def test_tiny_model_builds_for_gpu_without_a_gpu(gpu_artifact, kind, arch, dtype):
    root = gpu_artifact(kind, arch, dtype)
    assert check_binaries(root, kind, arch) > 10
    with open(os.path.join(root, "manifest.json")) as f:
        data = json.load(f)
    assert data["dtypes"]["weights"] == (dtype or "bf16") and data["kv_cache"]["block_size"] == 16


def test_artifact_plan_and_weights_reproduce_the_reference(tiny_llama, gpu_artifact):
    """The sm_90 artifact's own sources, plan and weights, run by the Triton runner. Built
    with --dtype f16: the GPU kernels' bf16 tl.dot is what Triton's interpreter gets wrong
    (bf16 is covered by the interpreter-arch runs in test_step.py)."""
    from llmc.runtime.executor_triton import TritonExecutor
    from tests.codegen.triton.test_step import executor_step, optimized, reference
    from tests.paged import check_mixed_batches

    root = gpu_artifact("cuda", "sm_90", "f16")
    executor = TritonExecutor.from_manifest(read_manifest(root), num_blocks=64, interpret=True)
    paged = optimized(tiny_llama)
    worst = check_mixed_batches(reference(tiny_llama), paged, tiny_llama.weights, 128, atol=1e-2,
                                run=executor_step(executor, paged), num_blocks=64)
    assert worst <= 1e-2


def test_unknown_arch_fails_before_any_work():
    from llmc.compiler.codegen import TargetError, get_target

    with pytest.raises(TargetError, match="sm_80, sm_89, sm_90"):
        get_target("cuda").check(CompileOptions(arch="sm_75"))
    with pytest.raises(TargetError, match="gfx90a, gfx942, gfx1100"):
        get_target("rocm").check(CompileOptions(arch="sm_90"))


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("kind,arch", [("cuda", "sm_90"), ("cuda", "sm_80"), ("rocm", "gfx942")])
def test_smollm2_builds_for_gpu_without_a_gpu(smollm2, kind, arch, tmp_path):
    _, _, imported = smollm2
    compile_gpu(imported, tmp_path / "art", kind, arch)
    assert check_binaries(str(tmp_path / "art"), kind, arch) > 10


def test_engine_runs_a_cuda_artifact_through_the_triton_runner(tiny_llama, gpu_artifact, monkeypatch):
    """Engine.load picks the GPU executor for a cuda artifact; with LLMC_GPU_EXECUTOR=triton (and
    no GPU) that is the Triton runner on the interpreter: the engine's prefill and decode logits
    match the reference interpreter's."""
    import torch

    from llmc.runtime import Engine
    from llmc.runtime.executor_triton import TritonExecutor
    from tests.codegen.triton.test_step import reference
    from tests.paged import alone_logits

    monkeypatch.setenv("LLMC_GPU_EXECUTOR", "triton")
    engine = Engine.load(gpu_artifact("cuda", "sm_90", "f16"), num_blocks=16)
    assert isinstance(engine.executor, TritonExecutor)
    tokens = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(3))
    want = alone_logits(reference(tiny_llama), tiny_llama.weights, tokens, [8, 1])
    got = [engine.step(tokens[:8].tolist()), engine.step([int(tokens[8])])]
    for g, w in zip(got, want):
        assert float((torch.as_tensor(g).float().reshape(-1) - w).abs().max()) < 1e-2


def test_bf16_artifact_is_refused_on_the_interpreter(gpu_artifact):
    from llmc.runtime.artifact import ArtifactError
    from llmc.runtime.executor_triton import TritonExecutor

    with pytest.raises(ArtifactError, match="--dtype f16"):
        TritonExecutor.from_manifest(read_manifest(gpu_artifact("rocm", "gfx942")), interpret=True)


def test_recurrent_state_models_are_refused_by_name(tmp_path):
    """The cuda/rocm targets have no kernels for the recurrent-state ops yet: a clear refusal
    that names them, and nothing written."""
    from llmc.compiler.codegen import TargetError, get_target
    from tests.frontend.arch_sweep import tiny_model as sweep_model

    imported = import_hf_model(sweep_model("lfm2"))
    with pytest.raises(TargetError, match="recurrent state .*causal_conv1d.*--target cpu"):
        get_target("cuda").compile(imported.module, imported.weights, str(tmp_path / "art"),
                                   CompileOptions(arch="sm_90", max_seq_len=128), {})
    assert not os.path.exists(tmp_path / "art")
