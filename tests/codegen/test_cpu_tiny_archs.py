"""Every tiny architecture, compiled for cpu and run by the runtime: 64 greedy tokens equal
to transformers' fp32 greedy continuation, prefill logits within 1e-3."""

import numpy as np
import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.runtime import Engine
from tests.codegen.helpers import compile_cpu, hf_greedy, llmc_greedy
from tests.tiny_models import TINY_ARCHS, tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_arch_compiled_greedy_matches_hf(arch, tmp_path):
    model = tiny_model(arch)
    compile_cpu(import_hf_model(model), tmp_path / "artifact", max_seq_len=128, cache_dir=tmp_path / "cache")
    engine = Engine.load(str(tmp_path / "artifact"))
    g = torch.Generator().manual_seed(7)
    for length in (5, 17, 40):  # short; past the sliding windows (6); over one key block (32)
        prompt = torch.randint(3, model.config.vocab_size, (length,), generator=g).tolist()
        want, want_logits = hf_greedy(model, prompt, 64)
        got, got_logits = llmc_greedy(engine, prompt, 64)
        assert np.abs(got_logits - want_logits).max() <= 1e-3
        assert got == want, f"{arch}: greedy continuation differs at {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
