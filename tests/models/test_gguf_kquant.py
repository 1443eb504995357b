"""A real Q4_K_M GGUF end to end (issue 10): llama.cpp's own quantizer requantizes the bundled
SmolLM2 Q4_1 file, llmc compiles it keeping every block type (Q4_K and Q6_K, and Q5_0/Q8_0
where llama.cpp falls back on rows of 576, no multiple of 256), and greedy tokens equal
transformers' on the same file.

Needs llama.cpp's ``llama-quantize``: set LLMC_LLAMA_QUANTIZE to its path (benchmarks/kquant.py
says how to build it)."""

import json
import os
import subprocess

import numpy as np
import pytest

from llmc.compiler.codegen import CompileOptions
from llmc.compiler.driver import compile_artifact
from llmc.compiler.frontend.hf import bundled_gguf, import_hf_model, load_hf_model, load_tokenizer, resolve_source
from llmc.runtime import Engine
from tests.codegen.helpers import hf_greedy, llmc_greedy

pytestmark = [pytest.mark.model, pytest.mark.slow]
QUANTIZE = os.environ.get("LLMC_LLAMA_QUANTIZE", "")


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    """(the Q4_K_M file, transformers' model of it, its tokenizer)."""
    from tests.conftest import require_bundled_model

    require_bundled_model()
    if not (QUANTIZE and os.access(QUANTIZE, os.X_OK)):
        pytest.skip("llama.cpp's llama-quantize not found: set LLMC_LLAMA_QUANTIZE to its path "
                    "(cmake --build BUILD --target llama-quantize; see benchmarks/kquant.py)")
    path = str(tmp_path_factory.mktemp("kquant") / "SmolLM2-135M-Instruct.Q4_K_M.gguf")
    proc = subprocess.run([QUANTIZE, "--allow-requantize", bundled_gguf(), path, "Q4_K_M", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = resolve_source(path)
    model = load_hf_model(source, use_cache=False)  # transformers' own GGUF reader: the reference
    return path, model, load_tokenizer(source, use_cache=False)


@pytest.fixture(scope="module", params=["intdot", "float-activations"])
def artifact(request, q4_k_m, tmp_path_factory):
    """The default build (x86-64: 4/8-bit linears on int8 activations) and one with float
    activations everywhere (LLMC_NO_INTDOT=1), where llmc must equal transformers to rounding."""
    path, model, tokenizer = q4_k_m
    out = tmp_path_factory.mktemp(f"kquant-{request.param}") / "cpu"
    saved = os.environ.pop("LLMC_NO_INTDOT", None)
    try:
        if request.param == "float-activations":
            os.environ["LLMC_NO_INTDOT"] = "1"
        # float activations are held to rounding: float32 KV pools too (the default for quantized
        # linears is float16, which alone moves the logits by ~2e-2)
        kv = "float32" if request.param == "float-activations" else None
        compile_artifact(import_hf_model(model), tokenizer, "cpu", str(out), CompileOptions(max_seq_len=256, kv_dtype=kv),
                         source=path, quant=None)
    finally:
        os.environ.pop("LLMC_NO_INTDOT", None)
        if saved is not None:
            os.environ["LLMC_NO_INTDOT"] = saved
    return request.param, out


def test_the_file_is_k_quant_and_the_artifact_keeps_every_block_type(q4_k_m, artifact):
    from gguf import GGUFReader

    path = q4_k_m[0]
    out = artifact[1]
    file_types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K"} <= file_types
    weights = json.loads((out / "manifest.json").read_text())["plan"]["weights"]
    kept = {w["origin"].rsplit(":", 1)[1] for w in weights.values() if w["origin"].startswith("quantized:")}
    assert kept == file_types - {"F32"}  # Q4_K, Q6_K, Q5_0, Q8_0: none inflated to float
    floats = [n for n, w in weights.items() if not w["origin"].startswith("quantized:")]
    assert all(len(weights[n]["shape"]) == 1 for n in floats), floats  # norm weights, rope frequencies


def test_greedy_tokens_equal_transformers_on_the_same_file(q4_k_m, artifact):
    _, model, tokenizer = q4_k_m
    kind, out = artifact
    engine = Engine.load(str(out))
    ids = tokenizer("The capital of France is")["input_ids"]
    want, want_logits = hf_greedy(model, ids, 16)
    got, got_logits = llmc_greedy(engine, ids, 16)
    assert got == want
    diff = np.abs(got_logits - want_logits)
    if kind == "float-activations":  # the blocks are the file's, bit-exact: only summation order differs
        assert diff.max() <= 1e-3
    else:
        # int8 activation blocks (d = max|x| / 127 per 32, as llama.cpp's Q8_K/Q8_0) feed the Q4_K
        # and Q8_0 linears, the Q8_0 LM head included: measured max 0.52 (1.4% of the logits'
        # spread of 37) and mean 0.09 (0.24%); the bounds leave ~2x for other ISAs' rounding
        spread = float(want_logits.max() - want_logits.min())
        assert diff.max() <= 0.03 * spread and diff.mean() <= 0.005 * spread
