"""Property test: each pass of the -O2 pipeline leaves the interpreter's outputs unchanged,
for every tiny architecture and for SmolLM2; and -O2 SmolLM2 still matches transformers."""

import pytest
import torch

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.passes import build_pipeline
from tests.paged import PagedBatcher, check_mixed_batches
from tests.passes.helpers import assert_same_outputs, model_outputs
from tests.tiny_models import TINY_ARCHS, tiny_model


def check_each_pass(module, weights, vocab, atol, batch_atol=None):
    """Every pass keeps the interpreter's outputs; the closing paged-kv lowering changes the
    function's signature, so it is checked by a mixed batch of several sequences through the
    paged IR against each sequence run alone through the IR before it. ``batch_atol``: a
    batch changes the matmuls' row counts and so fp32 summation orders; on a real model's
    logits (magnitude ~20) that alone moves them by ~1e-4."""
    current = model_outputs(module, weights, vocab)
    for p in build_pipeline("cpu", 2):
        if p.name == "paged-kv":
            before = parse_module(print_module(module))
            p.run(module)
            verify(module)
            check_mixed_batches(before, module, weights, vocab, atol=batch_atol or atol)
            continue
        p.run(module)
        verify(module)
        after = model_outputs(module, weights, vocab)
        try:
            assert_same_outputs(current, after, atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"pass {p.name} changed the outputs: {exc}") from None
        current = after
    return module


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_every_pass_preserves_outputs_on_tiny_models(arch):
    model = tiny_model(arch)
    imp = import_hf_model(model)
    module = check_each_pass(imp.module, imp.weights, model.config.vocab_size, atol=1e-5)
    assert any(op.kind == "fused" for op in module.functions["forward"].ops)


def test_every_pass_preserves_outputs_on_smollm2(smollm2):
    model, tokenizer, imp = smollm2
    module = parse_module(print_module(imp.module))
    module = check_each_pass(module, imp.weights, model.config.vocab_size, atol=1e-4, batch_atol=5e-4)
    # and the optimized module still matches transformers at the foundation's tolerance
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"][:32])
    with torch.no_grad():
        out = model(ids[None], use_cache=True)
        nxt = out.logits[0, -1].argmax().reshape(1)
        want_decode = model(nxt[None], past_key_values=out.past_key_values, use_cache=True).logits[0]
    batcher = PagedBatcher(module)  # the lowered module: one sequence through the paged step
    got = batcher.step([(0, ids)], weights=imp.weights)
    assert (got - out.logits[0]).abs().max() <= 1e-3
    assert torch.equal(got.argmax(-1), out.logits[0].argmax(-1))
    got_decode = batcher.step([(0, nxt)], weights=imp.weights)
    assert (got_decode - want_decode).abs().max() <= 1e-3
    assert torch.equal(got_decode.argmax(-1), want_decode.argmax(-1))


@pytest.mark.parametrize("arch", ["mixtral", "gpt2", pytest.param("gpt_oss", marks=pytest.mark.slow),
                                  pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_every_pass_preserves_outputs_on_newer_ops(arch):
    """moe and topk (Mixtral), layer_norm (GPT-2), attention sinks and the clamped expert gate
    (GPT-OSS), gather/scatter/where routers (DeepSeek-V3), through every pass and paged-kv."""
    from tests.frontend.arch_sweep import tiny_model as sweep_model

    model = sweep_model(arch)
    imp = import_hf_model(model)
    check_each_pass(imp.module, imp.weights, model.config.vocab_size, atol=1e-5)
