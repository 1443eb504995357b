"""The installed ``llmc`` command: compile to IR, print/verify IR, clear errors."""

import json
import os
import subprocess
import sys

from tests.conftest import require_bundled_model

GOOD_IR = """module @m {
  func @forward(%x: f32[T, 4]) -> (f32[T, 4]) {
    %y = neg(%x) : f32[T, 4]
    return %y
  }
}
"""


def llmc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_help_lists_commands():
    out = llmc("--help")
    assert out.returncode == 0
    for word in ("compile", "ir", "interpret", "smollm2"):
        assert word in out.stdout


def test_ir_command_prints_and_verifies(tmp_path):
    path = tmp_path / "m.llmc.ir"
    path.write_text(GOOD_IR)
    out = llmc("ir", str(path))
    assert out.returncode == 0 and out.stdout == GOOD_IR
    summary = llmc("ir", str(path), "--summary")
    assert "@forward: 1 ops (neg 1)" in summary.stdout


def test_ir_command_rejects_broken_ir(tmp_path):
    path = tmp_path / "bad.llmc.ir"
    path.write_text(GOOD_IR.replace("neg(%x)", "neg(%z)"))
    out = llmc("ir", str(path))
    assert out.returncode == 2
    assert "uses %z before its definition" in out.stderr and "Traceback" not in out.stderr


def test_compile_rejects_missing_model(tmp_path):
    out = llmc("compile", str(tmp_path / "nope.gguf"), "--emit", "ir")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_compile_bundled_model_to_ir(tmp_path):
    require_bundled_model()
    target = tmp_path / "smollm2.llmc.ir"
    out = llmc("compile", "smollm2", "--target", "cpu", "--emit", "ir", "-o", str(target), "--verbose")
    assert out.returncode == 0, out.stderr
    assert "traced with torch.export" in out.stderr and "stage timings" in out.stderr
    assert "imported: 2036 ops, 0 fused regions; per decoder layer (30 layers): 61 ops" in out.stderr
    assert "after -O2:" in out.stderr and "3 fused regions" in out.stderr
    assert "pass fuse-elementwise" in out.stderr
    assert f"wrote IR {target}" in out.stdout
    verified = llmc("ir", str(target), "--summary")
    assert verified.returncode == 0 and "attention 30" in verified.stdout and "fused 91" in verified.stdout
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_passes_lists_pipelines():
    out = llmc("passes")
    assert out.returncode == 0
    assert "fuse-elementwise" in out.stdout and "-O2: canonicalize ->" in out.stdout


def test_print_after_and_debug_dump(tmp_path):
    from tests.tiny_models import tiny_model

    tiny_model("qwen2").save_pretrained(tmp_path / "tiny")
    dump = tmp_path / "dump"
    out = llmc("compile", str(tmp_path / "tiny"), "--emit", "ir", "-o", str(tmp_path / "t.llmc.ir"),
               "--print-after", "recognize-rope", "--debug-dump", str(dump))
    assert out.returncode == 0, out.stderr
    assert "// ----- IR after recognize-rope -----" in out.stdout and " = rope(" in out.stdout
    files = sorted(os.listdir(dump))
    assert files[0] == "00-input.llmc.ir" and files[-1] == "14-paged-kv.llmc.ir"
    assert (dump / files[-1]).read_text() == (tmp_path / "t.llmc.ir").read_text()


def test_unknown_pass_and_level_are_clear_errors(tmp_path):
    out = llmc("compile", "smollm2", "--pass", "nosuchmodule:X", "-o", str(tmp_path / "x"))
    assert out.returncode == 2 and "cannot import nosuchmodule" in out.stderr
    out = llmc("compile", "smollm2", "--pass-after", "cse", "-o", str(tmp_path / "x"))
    assert out.returncode == 2 and "--pass-after needs" in out.stderr


def test_unknown_metal_arch_fails_before_the_import(tmp_path):
    out = llmc("compile", "smollm2", "--target", "metal", "--arch", "sm_90", "-o", str(tmp_path / "never"))
    assert out.returncode == 2 and "use one of apple-m1, apple-m2, apple-m3, apple-m4" in out.stderr
    assert not os.path.exists(tmp_path / "never")


def test_unknown_gpu_arch_fails_before_the_import(tmp_path):
    out = llmc("compile", "smollm2", "--target", "cuda", "--arch", "sm_75", "-o", str(tmp_path / "never"))
    assert out.returncode == 2 and "use one of sm_80, sm_89, sm_90" in out.stderr
    assert not os.path.exists(tmp_path / "never")


def test_second_compile_of_the_bundled_model_reuses_both_caches(tmp_path):
    """The second `llmc compile` of the same GGUF reads the cached conversion and the cached
    kernels (that is what makes it fast: see benchmarks/compile_time.py) and writes the same
    artifact, which then generates text through `llmc run`."""
    require_bundled_model()
    first = llmc("compile", "smollm2", "--target", "cpu", "-o", str(tmp_path / "a"), "--max-seq-len", "256", "-v")
    assert first.returncode == 0, first.stderr
    second = llmc("compile", "smollm2", "--target", "cpu", "-o", str(tmp_path / "b"), "--max-seq-len", "256", "-v")
    assert second.returncode == 0, second.stderr
    assert "GGUF conversion cache hit" in second.stderr and "kernel cache hit" in second.stderr
    for name in os.listdir(tmp_path / "a"):
        if os.path.isfile(tmp_path / "a" / name):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    out = llmc("run", str(tmp_path / "b"), "--prompt", "The capital of France is", "--max-tokens", "8")
    assert out.returncode == 0 and "Paris" in out.stdout, out.stdout + out.stderr
    schema = '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
    out = llmc("run", str(tmp_path / "b"), "--chat", "--prompt", "The capital of France, as JSON with key city.",
               "--max-tokens", "40", "--json-schema", schema)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["city"] == "Paris", out.stdout
    out = llmc("run", str(tmp_path / "b"), "--prompt", "x", "--regex", "([a-z]")
    assert out.returncode == 2 and "invalid constraint" in out.stderr and "unclosed group" in out.stderr


def test_unreadable_models_are_clear_errors(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(1000))
    env = dict(os.environ, LLMC_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", str(fake), "-o", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "transformers cannot load" in out.stderr and "GGUF" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "a").exists()
    assert f"loading {fake}" in out.stderr  # progress lines are on by default (-q turns them off)
    assert os.listdir(tmp_path / "cache" / "models") == []  # no half-made conversion left behind
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text('{"model_type": "no-such-architecture"}')
    out = llmc("compile", str(weird), "--emit", "ir", "-o", str(tmp_path / "w.llmc.ir"), "-q")
    assert out.returncode == 2 and "transformers cannot load" in out.stderr and "Traceback" not in out.stderr
    assert "loading" not in out.stderr


def test_run_constraints_are_checked_before_loading(tmp_path):
    out = llmc("run", "nowhere", "--prompt", "x", "--regex", "a+", "--choice", "a", "b")
    assert out.returncode == 2 and "give one output constraint, not --regex and --choice" in out.stderr
    out = llmc("run", "nowhere", "--prompt", "x", "--json-schema", "{not json")
    assert out.returncode == 2 and "--json-schema: the JSON schema is not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr


def test_zero_or_negative_sizes_are_refused_by_the_parser():
    for args in (("compile", "smollm2", "--max-seq-len", "0"), ("compile", "smollm2", "--threads", "-2"),
                 ("run", "nowhere", "--max-tokens", "0", "--prompt", "x")):
        out = llmc(*args)
        assert out.returncode == 2 and "must be at least 1" in out.stderr, args


def test_quant_list_and_bad_schemes_fail_before_any_import(tmp_path):
    out = llmc("compile", "--quant", "list")
    assert out.returncode == 0 and "q4_g32" in out.stdout and "gguf" in out.stdout and "q8a_g128" in out.stdout
    out = llmc("compile", str(tmp_path), "--quant", "q3_g32")
    assert out.returncode == 2 and "unknown quantization scheme 'q3_g32'" in out.stderr
    out = llmc("compile", str(tmp_path), "--quant", "gguf")
    assert out.returncode == 2 and "is not a .gguf file" in out.stderr
    out = llmc("compile", str(tmp_path), "--quant-calibration", str(tmp_path / "c.txt"))
    assert out.returncode == 2 and "add --quant q4_g32" in out.stderr
    out = llmc("compile", str(tmp_path), "--quant", "q4_g32", "--quant-calibration", str(tmp_path / "c.txt"))
    assert out.returncode == 2 and "no such file" in out.stderr
    out = llmc("compile", str(tmp_path), "--quant", "q4_g32", "--quant-method", "awq")
    assert out.returncode == 2 and "invalid choice: 'awq'" in out.stderr and "gptq" in out.stderr


def test_eval_ppl_names_a_missing_text(tmp_path):
    out = llmc("eval-ppl", str(tmp_path), "--text", str(tmp_path / "none.txt"))
    assert out.returncode == 2 and "cannot read --text" in out.stderr


def test_kv_dtype_is_a_cpu_option_checked_before_the_import(tmp_path):
    out = llmc("compile", "smollm2", "--target", "cuda", "--kv-dtype", "float16", "-o", str(tmp_path / "never"))
    assert out.returncode == 2 and "--kv-dtype is a cpu option" in out.stderr
    out = llmc("compile", "smollm2", "--kv-dtype", "bf16", "-o", str(tmp_path / "never"))
    assert out.returncode == 2 and "invalid choice: 'bf16'" in out.stderr
    assert not os.path.exists(tmp_path / "never")
