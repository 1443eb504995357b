"""A mixture-of-experts model (Mixtral: softmax router, top-2, moe op) and a LayerNorm model
(GPT-2: layer_norm with bias, learned absolute positions, addmm projections) compiled for cpu:
32 greedy tokens equal transformers' fp32 greedy continuation, prefill logits within 1e-3."""

import numpy as np
import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.runtime import Engine
from tests.codegen.helpers import compile_cpu, hf_greedy, llmc_greedy
from tests.frontend.arch_sweep import tiny_model


@pytest.mark.parametrize("arch, op", [
    ("mixtral", "moe"), ("gpt2", "layer_norm"),
    # GPT-OSS: attention sinks, clamped swish-alpha gate over interleaved rows, expert biases
    pytest.param("gpt_oss", "moe", marks=pytest.mark.slow),
])
def test_compiled_greedy_matches_hf(arch, op, tmp_path):
    model = tiny_model(arch)
    imported = import_hf_model(model)
    assert any(o.kind == op for o in imported.module.functions["forward"].ops)
    compile_cpu(imported, tmp_path / "artifact", max_seq_len=128, cache_dir=tmp_path / "cache")
    engine = Engine.load(str(tmp_path / "artifact"))
    g = torch.Generator().manual_seed(7)
    for length in (5, 17):
        prompt = torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
        want, want_logits = hf_greedy(model, prompt, 32)
        got, got_logits = llmc_greedy(engine, prompt, 32)
        assert np.abs(got_logits - want_logits).max() <= 1e-3
        assert got == want
