"""Every GGUF block type a published file uses, end to end: a tiny llama GGUF whose 16 matrices
take Q2_K, Q3_K, TQ1_0, TQ2_0, MXFP4, NVFP4, the seven IQ types, Q4_K, ... in turn (random
blocks, `gguf_random.py`), loaded by transformers (the reference: gguf's dequantization in
fp32) and compiled by llmc, which must keep every matrix in the file's blocks, none inflated.

The model is random, so the check is logits along one token sequence (teacher-forced: both
engines see the same tokens), not greedy text, which near-ties of a random model can flip."""

import json

import numpy as np
import pytest
import torch

from llmc.compiler.frontend.gguf_scaled_codes import available
from llmc.compiler.frontend.gguf_weights import QUANT_TYPES
from llmc.compiler.frontend.hf import load_hf_model, resolve_source
from llmc.runtime import Engine
from tests.codegen.helpers import compile_gguf_cpu
from tests.frontend.gguf_random import write_tiny_llama

# the 15 scaled-code types first, then one of the classic ones in the 16th matrix (the LM head)
TYPES = [t for t in available()] + [t for t in QUANT_TYPES if t not in available()]
PROMPT = [1, 5, 9, 33, 100, 7, 200, 3, 42, 77]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("every-type") / "tiny.gguf")
    chosen = write_tiny_llama(path, TYPES)
    return path, chosen, load_hf_model(resolve_source(path), use_cache=False)


@pytest.fixture(scope="module", params=["intdot", "float-activations"])
def artifact(request, tiny, tmp_path_factory):
    path, _, model = tiny
    out = tmp_path_factory.mktemp(f"every-type-{request.param}") / "cpu"
    compile_gguf_cpu(model, path, out, float_activations=request.param == "float-activations", max_seq_len=64)
    return request.param, out


def test_every_matrix_keeps_its_block_type(tiny, artifact):
    _, chosen, _ = tiny
    weights = json.loads((artifact[1] / "manifest.json").read_text())["plan"]["weights"]
    origins = {w["origin"] for w in weights.values() if w["origin"].startswith("quantized:")}  # codes, scales, mins
    kept = sorted(o.rsplit(":", 1)[1] for o in origins)
    assert kept == sorted(chosen.values())  # 16 matrices, each in its own file type
    assert set(available()) <= set(kept)
    assert all(len(w["shape"]) == 1 for w in weights.values() if not w["origin"].startswith("quantized:"))


def test_logits_equal_transformers_on_the_same_file(tiny, artifact):
    _, _, model = tiny
    kind, out = artifact
    engine = Engine.load(str(out))
    tokens = PROMPT + [11, 250, 4, 4, 180, 60]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0, len(PROMPT) - 1:].numpy()
    engine.reset()
    got = [engine.step(PROMPT)] + [engine.step([t]) for t in tokens[len(PROMPT):]]
    got = np.stack([np.asarray(g, np.float32).reshape(-1) for g in got])
    diff = np.abs(got - want)
    spread = float(want.max() - want.min())
    if kind == "float-activations":  # the file's blocks, bit-exact: only the summation order differs
        assert diff.max() <= 1e-4 * (1 + spread), diff.max()
    else:
        # int8 activation blocks (d = max|x| / 127 per 32) into 4-, 5- and 8-bit codes: measured
        # max 0.6% and mean 0.14% of the logits' spread; the bounds leave ~3x for other ISAs
        assert diff.max() <= 0.02 * spread and diff.mean() <= 0.004 * spread, (diff.max(), diff.mean(), spread)
