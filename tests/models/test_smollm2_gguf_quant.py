"""SmolLM2 compiled from its Q4_1 GGUF with the file's own blocks (the default for a GGUF on
cpu): the artifact's weights are no bigger than the GGUF, and since the blocks dequantize
bit for bit to the weights transformers reads from the file, greedy tokens equal
transformers' and the perplexity on the shipped text is within 0.5% (issue 10, point 2)."""

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


@pytest.fixture(scope="module")
def gguf_artifact(smollm2, tmp_path_factory):
    _, tokenizer, imported = smollm2
    out = tmp_path_factory.mktemp("smollm2-gguf") / "cpu"
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    compile_artifact(copy, tokenizer, "cpu", str(out), CompileOptions(max_seq_len=512), source="smollm2", quant=None)
    return out


def test_artifact_keeps_the_gguf_blocks_and_size(gguf_artifact):
    manifest = json.loads((gguf_artifact / "manifest.json").read_text())
    assert manifest["model"]["quant"] == "gguf"
    origins = {w["origin"] for w in manifest["plan"]["weights"].values()}
    assert any(o.endswith(":Q4_1") for o in origins) and any(o.endswith(":Q8_0") for o in origins)
    size = os.path.getsize(gguf_artifact / "weights.safetensors")
    assert size <= 1.10 * os.path.getsize(bundled_gguf())


def test_greedy_and_perplexity_match_transformers(smollm2, gguf_artifact):
    model, tokenizer, _ = smollm2
    engine = Engine.load(str(gguf_artifact))
    ids = tokenizer("The capital of France is")["input_ids"]
    want, want_logits = hf_greedy(model, ids, 32)
    got, got_logits = llmc_greedy(engine, ids, 32)
    assert got == want and np.abs(got_logits - want_logits).max() <= 1e-3
    text_ids = tokenizer(open(TEXT, encoding="utf-8").read(), add_special_tokens=False)["input_ids"][:600]

    def hf(w):
        with torch.no_grad():
            return model(torch.as_tensor(w)[None]).logits[0].numpy()

    ours = perplexity(text_ids, lambda w: all_logits(engine.executor, w), window=256, stride=128)
    theirs = perplexity(text_ids, hf, window=256, stride=128)
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.005
