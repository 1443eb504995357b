"""SmolLM2 compiled from its Q4_1 GGUF with the file's own blocks (the default for a GGUF on
cpu): the artifact's weights are no bigger than the GGUF; with float activations
(LLMC_NO_INTDOT=1) the blocks dequantize bit for bit to the weights transformers reads from
the file, so greedy tokens and logits equal transformers'; the default build (x86-64: int8
activation blocks into the linears, as llama.cpp's Q8_1) stays within 0.5% of transformers'
perplexity on the shipped text (issue 10, point 2) and close in logits."""

import json
import os

import numpy as np
import pytest
import torch

from llmc.compiler.codegen import CompileOptions
from llmc.compiler.driver import compile_artifact
from llmc.compiler.frontend import ImportedModel
from llmc.compiler.frontend.hf import bundled_gguf
from llmc.compiler.ir import parse_module, print_module
from llmc.runtime import Engine
from llmc.runtime.perplexity import all_logits, perplexity
from tests.codegen.helpers import hf_greedy, llmc_greedy

pytestmark = [pytest.mark.model, pytest.mark.slow]
TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data", "english.txt")


@pytest.fixture(scope="module", params=["intdot", "float-activations"])
def gguf_artifact(request, smollm2, tmp_path_factory):
    """The default build and one with float activations everywhere (LLMC_NO_INTDOT=1) and
    float32 KV pools (float16 alone moves the logits by ~2e-2), which must equal transformers."""
    _, tokenizer, imported = smollm2
    out = tmp_path_factory.mktemp(f"smollm2-gguf-{request.param}") / "cpu"
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    saved = os.environ.pop("LLMC_NO_INTDOT", None)
    try:
        exact = request.param == "float-activations"
        if exact:
            os.environ["LLMC_NO_INTDOT"] = "1"
        compile_artifact(copy, tokenizer, "cpu", str(out),
                         CompileOptions(max_seq_len=512, kv_dtype="float32" if exact else None),
                         source="smollm2", quant=None)
    finally:
        os.environ.pop("LLMC_NO_INTDOT", None)
        if saved is not None:
            os.environ["LLMC_NO_INTDOT"] = saved
    return request.param, out


def test_artifact_keeps_the_gguf_blocks_and_size(gguf_artifact):
    gguf_artifact = gguf_artifact[1]
    manifest = json.loads((gguf_artifact / "manifest.json").read_text())
    assert manifest["model"]["quant"] == "gguf"
    origins = {w["origin"] for w in manifest["plan"]["weights"].values()}
    assert any(o.endswith(":Q4_1") for o in origins) and any(o.endswith(":Q8_0") for o in origins)
    size = os.path.getsize(gguf_artifact / "weights.safetensors")
    assert size <= 1.10 * os.path.getsize(bundled_gguf())


def test_greedy_and_perplexity_match_transformers(smollm2, gguf_artifact):
    model, tokenizer, _ = smollm2
    kind, out = gguf_artifact
    engine = Engine.load(str(out))
    ids = tokenizer("The capital of France is")["input_ids"]
    if kind == "float-activations":  # the file's blocks, bit-exact: only summation order differs
        want, want_logits = hf_greedy(model, ids, 32)
        got, got_logits = llmc_greedy(engine, ids, 32)
        assert got == want and np.abs(got_logits - want_logits).max() <= 1e-3
    else:  # int8 activation blocks: logits over the prompt close to transformers' (a bound on the spread)
        with torch.no_grad():
            want_logits = model(torch.as_tensor(ids)[None]).logits[0].numpy()
        diff = np.abs(all_logits(engine.executor, ids) - want_logits)
        spread = float(want_logits.max() - want_logits.min())
        assert diff.max() <= 0.05 * spread and diff.mean() <= 0.01 * spread, (diff.max(), diff.mean(), spread)
    text_ids = tokenizer(open(TEXT, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    # exact build: a 600-token slice is enough; int8 activations: the whole text at eval-ppl's
    # windows, the measurement issue 10's 0.5% is about (the README's -0.29%; a 600-token slice
    # at window 256 measured 1.4%, too few tokens for a 0.5% bound)
    window, stride = (256, 128) if kind == "float-activations" else (512, 256)
    if kind == "float-activations":
        text_ids = text_ids[:600]

    def hf(w):
        with torch.no_grad():
            return model(torch.as_tensor(w)[None]).logits[0].numpy()

    ours = perplexity(text_ids, lambda w: all_logits(engine.executor, w), window=window, stride=stride)
    theirs = perplexity(text_ids, hf, window=window, stride=stride)
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.005, (kind, ours.perplexity, theirs.perplexity)
