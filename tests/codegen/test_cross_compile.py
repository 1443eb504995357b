"""--mcpu: artifacts for another x86-64 CPU run here; artifacts for AArch64 are cross-linked
(llmc[cross]) into an AArch64 library that this x86-64 machine refuses with a clear message
(test_aarch64_qemu.py runs them under emulation)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmc.compiler.codegen import TargetError
from llmc.compiler.codegen.llvm_cpu import resolve_cpu
from llmc.compiler.frontend import import_hf_model
from llmc.runtime import ArtifactError, Engine
from llmc.runtime.cpu_features import host_arch
from tests.codegen.helpers import compile_cpu, llmc_greedy
from tests.tiny_models import tiny_model

ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def _elf_machine(path) -> int:
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def test_cpu_names_resolve_to_architecture_and_checkable_features():
    n1 = resolve_cpu("neoverse-n1")
    assert (n1.arch, n1.triple) == ("aarch64", "aarch64-linux-gnu") and "asimd" in n1.required_flags
    assert "sve" in resolve_cpu("neoverse-v1").required_flags
    v3 = resolve_cpu("x86-64-v3")
    assert v3.arch == "x86_64" and "avx2" in v3.required_flags and "avx512f" not in v3.required_flags
    assert resolve_cpu("aarch64").mcpu == "generic"
    with pytest.raises(TargetError, match="LLVM knows no x86-64 or AArch64 CPU of that name"):
        resolve_cpu("pentium-9000")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama")
    return model, import_hf_model(model)


@pytest.mark.skipif(host_arch() != "x86_64", reason="builds an older x86-64 level and runs it here")
def test_older_x86_level_artifact_runs_here_with_the_same_tokens(tiny, tmp_path):
    _, imported = tiny
    host = tmp_path / "host"
    compile_cpu(imported, host, max_seq_len=64, cache_dir=tmp_path / "cache")
    compile_cpu(imported, tmp_path / "v3", max_seq_len=64, cache_dir=tmp_path / "cache", mcpu="x86-64-v3")
    manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    assert manifest["target"]["mcpu"] == "x86-64-v3" and "avx512f" not in manifest["target"]["required_cpu_features"]
    prompt = [5, 9, 13, 2, 7]
    got, got_logits = llmc_greedy(Engine.load(str(tmp_path / "v3")), prompt, 16)
    want, want_logits = llmc_greedy(Engine.load(str(host)), prompt, 16)
    assert got == want and np.abs(got_logits - want_logits).max() <= 1e-4


@pytest.mark.skipif(host_arch() != "x86_64", reason="cross-builds AArch64 from x86-64")
def test_aarch64_artifact_is_cross_linked_and_refused_here(tiny, tmp_path):
    pytest.importorskip("ziglang", reason="cross-building needs llmc[cross]")
    _, imported = tiny
    out = tmp_path / "arm"
    compile_cpu(imported, out, max_seq_len=64, cache_dir=tmp_path / "cache", mcpu="neoverse-n1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and manifest["target"]["triple"] == "aarch64-linux-gnu"
    assert "asimd" in manifest["target"]["required_cpu_features"]
    assert _elf_machine(out / "kernels" / "step.so") == ELF_MACHINE["aarch64"]
    # a dotprod CPU: quantized linears take the NEON integer kernels' 4-lane layout (intdot.py)
    quant = tmp_path / "arm-q4"
    compile_cpu(imported, quant, max_seq_len=64, cache_dir=tmp_path / "cache", mcpu="neoverse-n1", quant="q4_g32")
    target = json.loads((quant / "manifest.json").read_text())
    assert "asimddp" in target["target"]["required_cpu_features"]
    layouts = [w["layout"] for w in target["plan"]["weights"].values()]
    assert any(lay.startswith("intdot4-codes") for lay in layouts) and not any(lay.startswith(("intdot8", "intdot16"))
                                                                              for lay in layouts)
    with pytest.raises(ArtifactError, match="compiled for aarch64 .*this machine is x86_64"):
        Engine.load(str(out))
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(out), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "compile for this one" in run.stderr and "Traceback" not in run.stderr


def test_cross_build_without_a_cross_linker_fails_fast(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_zig(name, *args, **kwargs):
        if name == "ziglang":
            raise ImportError("no ziglang")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zig)
    monkeypatch.setattr(shutil, "which", lambda _: None)
    other = "neoverse-n1" if host_arch() == "x86_64" else "x86-64-v3"
    from llmc.compiler.codegen import CompileOptions
    from llmc.compiler.driver import resolve_target

    with pytest.raises(TargetError, match=r"needs a cross linker: pip install 'llmc\[cross\]'"):
        resolve_target("cpu").check(CompileOptions(mcpu=other))
