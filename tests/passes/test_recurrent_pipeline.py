"""Hybrid models with recurrent state (short convolutions, gated delta rule) through every pass
of the -O2 pipeline: outputs unchanged, and after paged-kv a mixed batch of sequences (chunked
prefills, decode tokens, a late joiner) in their own state slots matches each sequence alone."""

import pytest

from llmc.compiler.frontend import import_hf_model
from tests.frontend.arch_sweep import tiny_model
from tests.passes.test_pipeline_equivalence import check_each_pass


@pytest.mark.parametrize("arch", ["lfm2", pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_pipeline_and_paged_batches_keep_recurrent_models(arch):
    model = tiny_model(arch)
    imp = import_hf_model(model)
    kinds = {op.kind for op in imp.module.functions["forward"].ops}
    assert "causal_conv1d" in kinds and ("gated_delta_rule" in kinds) == (arch == "qwen3_next")
    module = check_each_pass(imp.module, imp.weights, model.config.vocab_size, atol=1e-4)
    fn = module.functions["forward"]
    names = [a.name for a in fn.args]
    assert "state_slots" in names and any(n.startswith("state_pool_") for n in names)
    assert not {"causal_conv1d", "gated_delta_rule"} & {op.kind for op in fn.ops}
