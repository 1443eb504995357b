"""Loading artifacts: no compiler or transformers in the runtime (TVM itself may import torch
when it is installed; the runtime does not need it); every bad artifact fails
with a message saying what is wrong and what to do, and a non-zero exit code."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llmc.compiler.frontend import import_hf_model
from tests.codegen.helpers import compile_cpu
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "not-yet-created" / "cpu"  # the writer makes parents
    compile_cpu(import_hf_model(tiny_model("llama")), out, max_seq_len=64)
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=300)


def test_runtime_imports_neither_transformers_nor_the_compiler(artifact):
    code = (
        "import sys; from llmc.runtime import Engine\n"
        f"e = Engine.load({str(artifact)!r}); logits = e.step([5, 6, 7]); logits2 = e.step([8])\n"
        "assert logits.shape == (128,) and logits2.shape == (128,)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' "
        "or m.startswith('llmc.compiler'))\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout, out.stdout


def broken_copy(artifact, tmp_path, edit):
    copy = tmp_path / "broken"
    shutil.copytree(artifact, copy)
    edit(copy)
    return copy


def edit_manifest(change):
    def edit(root):
        path = root / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def corrupt_weights(root):
    path = root / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit, message", [
    (corrupt_weights, "weights.safetensors in"),
    (edit_manifest(lambda d: d.update(format_version=99)), "artifact format version 99"),
    (edit_manifest(lambda d: d["target"].update(kind="cuda")), "compiled for target 'cuda'"),
    (edit_manifest(lambda d: d["target"].update(required_cpu_features=["avx512_nonexistent"])),
     "needs CPU features this machine lacks (avx512_nonexistent)"),
    (lambda root: os.remove(root / "kernels" / "step.so"), "is missing kernels/step.so"),
    (lambda root: os.remove(root / "manifest.json"), "has no manifest.json"),
])
def test_bad_artifacts_fail_clearly(artifact, tmp_path, edit, message):
    copy = broken_copy(artifact, tmp_path, edit)
    out = run_cli("run", str(copy), "--prompt", "hello")
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert any(word in out.stderr for word in ("compile", "recompile"))  # says what to do


def test_over_long_prompt_and_bad_token_are_refused(artifact):
    from llmc.runtime import Engine

    engine = Engine.load(str(artifact))
    with pytest.raises(ValueError, match="over this artifact's limit of 64"):
        engine.step(list(range(3, 70)))
    with pytest.raises(ValueError, match="token id out of range"):
        engine.step([128])
