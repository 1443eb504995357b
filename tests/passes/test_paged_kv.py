"""paged-kv: IR before/after on a hand-written module; then, on every tiny architecture, a
mixed batch of prefill chunks and decode tokens of several sequences through the paged IR gives
each sequence the logits it gets alone through the unpaged IR. (SmolLM2 after the whole -O2
pipeline: tests/passes/test_pipeline_equivalence.py.)"""

import pytest

from llmc.compiler.frontend import import_hf_model
from llmc.compiler.ir import parse_module, print_module, verify
from llmc.compiler.passes import get_pass
from llmc.compiler.passes.paged_kv import PagedKV, PagedKVError
from tests.paged import check_mixed_batches
from tests.passes.helpers import assert_pass_output
from tests.tiny_models import TINY_ARCHS, tiny_model

BEFORE = """module @m {
  func @forward(%input_ids: i64[T], %positions: i64[T], %q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 6]) -> (f32[T, 4, 6]) {
    %attn0 = attention(%q, %k, %v, %positions) {layer = 0, scale = 0.35, window = 5, softcap = 0.0} : f32[T, 4, 6]
    return %attn0
  }
}
"""

AFTER = """module @m {
  func @forward(%input_ids: i64[T], %positions: i64[T], %slot_mapping: i64[T], %block_tables: i64[B, MB], %seq_lens: i64[B], %query_start: i64[B + 1], %q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 6], %k_pool_0: f32[NB, 4, 2, 8], %v_pool_0: f32[NB, 4, 2, 6]) -> (f32[T, 4, 6], f32[NB, 4, 2, 8], f32[NB, 4, 2, 6]) {
    %k_pool_0_new, %v_pool_0_new = kv_append(%k_pool_0, %v_pool_0, %k, %v, %slot_mapping) : f32[NB, 4, 2, 8], f32[NB, 4, 2, 6]
    %attn0 = paged_attention(%q, %k_pool_0_new, %v_pool_0_new, %block_tables, %seq_lens, %query_start) {scale = 0.35, window = 5, softcap = 0.0} : f32[T, 4, 6]
    return %attn0, %k_pool_0_new, %v_pool_0_new
  }
}
"""


def test_attention_becomes_kv_append_and_paged_attention():
    assert_pass_output(PagedKV(block_size=4), BEFORE, AFTER)


def test_block_size_comes_from_the_module_attribute():
    module = parse_module(BEFORE)
    module.attrs["kv_block_size"] = 8
    get_pass("paged-kv").run(module)
    verify(module)
    assert "f32[NB, 8, 2, 8]" in print_module(module)


def test_running_twice_changes_nothing():
    module = parse_module(BEFORE)
    PagedKV(4).run(module)
    text = print_module(module)
    assert print_module(PagedKV(4).run(module)) == text


def test_layers_must_be_numbered_from_zero():
    module = parse_module(BEFORE.replace("layer = 0", "layer = 3"))
    with pytest.raises(PagedKVError, match=r"layers \[3\]"):
        PagedKV(4).run(module)


def _lowered(model):
    imported = import_hf_model(model)
    before = imported.module
    get_pass("select-logits").run(before)
    after = parse_module(print_module(before))
    return imported, before, after


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_mixed_batches_match_sequences_run_alone(arch, block_size):
    model = tiny_model(arch)
    imported, before, after = _lowered(model)
    PagedKV(block_size).run(after)
    verify(after)
    assert not any(op.kind == "attention" for op in after.functions["forward"].ops)
    check_mixed_batches(before, after, imported.weights, model.config.vocab_size, atol=1e-5)
