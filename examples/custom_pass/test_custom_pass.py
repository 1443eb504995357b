"""The custom-pass example, from its test and from the CLI."""

import os
import subprocess
import sys

import pytest

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.passes import PassError, PassManager, all_passes, build_pipeline, get_pass
from my_passes import BreaksTheIR, SquareToMul

HERE = os.path.dirname(os.path.abspath(__file__))

BEFORE = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %two = constant() {value = 2.0, dtype = "f32"} : f32[]
    %three = constant() {value = 3.0, dtype = "f32"} : f32[]
    %sq = pow(%x, %two) : f32[T, 8]
    %cube = pow(%x, %three) : f32[T, 8]
    %y = add(%sq, %cube) : f32[T, 8]
    return %y
  }
}
"""
AFTER = """module @m {
  func @forward(%x: f32[T, 8]) -> (f32[T, 8]) {
    %three = constant() {value = 3.0, dtype = "f32"} : f32[]
    %0 = mul(%x, %x) : f32[T, 8]
    %cube = pow(%x, %three) : f32[T, 8]
    %y = add(%0, %cube) : f32[T, 8]
    return %y
  }
}
"""


def tiny_model_dir(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "..", ".."))
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny-llama")
    return model, str(tmp_path / "tiny-llama")


def test_rewrite_on_ir_text():
    module = parse_module(BEFORE)
    SquareToMul().run(module)
    verify(module)
    assert print_module(module) == AFTER


def test_pass_keeps_model_outputs(tmp_path):
    from tests.passes.helpers import assert_same_outputs, model_outputs

    model, _ = tiny_model_dir(tmp_path)
    imp = import_hf_model(model)
    before = model_outputs(imp.module, imp.weights, model.config.vocab_size)
    p = SquareToMul()
    module = PassManager([p]).run(imp.module)
    assert p.fired == 5  # one RMSNorm square per norm: 2 per layer, 2 layers, plus the final norm
    assert_same_outputs(before, model_outputs(module, imp.weights, model.config.vocab_size))


def test_pass_from_the_command_line(tmp_path):
    _, model_dir = tiny_model_dir(tmp_path)
    out = tmp_path / "tiny.llmc.ir"
    env = dict(os.environ, PYTHONPATH=HERE)
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", model_dir, "--emit", "ir", "-o", str(out),
                          "--pass", "my_passes:SquareToMul", "--pass-after", "canonicalize", "--verbose"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "square-to-mul" in run.stderr
    text = out.read_text()
    assert " = pow(" not in text and " = mul(" in text


def test_breaking_pass_is_caught_with_its_name():
    module = parse_module(BEFORE)
    with pytest.raises(PassError) as err:
        PassManager([BreaksTheIR()]).run(module)
    assert "pass 'breaks-the-ir' produced invalid IR" in str(err.value)
    assert err.value.dump_path and os.path.exists(err.value.dump_path)


def test_raising_pass_reports_name_dumps_ir_and_writes_nothing(tmp_path):
    _, model_dir = tiny_model_dir(tmp_path)
    out = tmp_path / "never.llmc.ir"
    dump = tmp_path / "dump"
    env = dict(os.environ, PYTHONPATH=HERE)
    run = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", model_dir, "--emit", "ir", "-o", str(out),
                          "--pass", "my_passes:raises", "--debug-dump", str(dump)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    assert "pass 'raises' raised RuntimeError: this pass always fails" in run.stderr
    assert "Nothing was written" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()
    dumped = [f for f in os.listdir(dump) if f.endswith("-raises-input.llmc.ir")]
    assert dumped, os.listdir(dump)
    verify(parse_module((dump / dumped[0]).read_text()))


def test_entry_point_discovery(tmp_path, monkeypatch):
    """A package that declares the llmc.passes entry point is found without --pass."""
    dist = tmp_path / "llmc_example_passes-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmc-example-passes\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[llmc.passes]\nsquare-to-mul = my_passes:SquareToMul\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(get_pass("square-to-mul"), SquareToMul)
    assert "square-to-mul" in all_passes()
    pipeline = build_pipeline("cpu", 1, [get_pass("square-to-mul")], after="canonicalize")
    assert [p.name for p in pipeline][:2] == ["canonicalize", "square-to-mul"]
