"""kv_append and paged_attention: type rules, the verifier's pool rule, and the interpreter's
meaning checked against the per-sequence ``attention`` reference on random block tables."""

import pytest
import torch

from llmc.compiler.ir import KVCache, VerifyError, parse_module, verify
from llmc.compiler.ir.interpreter import (InterpreterError, attention_reference, kv_append_reference,
                                          paged_attention_reference)

STEP = """module @m {
  func @forward(%k_pool: f32[NB, 4, 2, 8], %v_pool: f32[NB, 4, 2, 6], %q: f32[T, 4, 8], %k: f32[T, 2, 8], %v: f32[T, 2, 6], %slots: i64[T], %tables: i64[B, MB], %lens: i64[B], %starts: i64[B + 1]) -> (RESULTS) {
    %kp, %vp = kv_append(%k_pool, %v_pool, %k, %v, %slots) : f32[NB, 4, 2, 8], f32[NB, 4, 2, 6]
    %out = paged_attention(%q, %kp, %vp, %tables, %lens, %starts) {scale = 0.3, window = 0, softcap = 0.0} : f32[T, 4, 6]
    return RETURNED
  }
}
"""


def test_a_well_formed_step_verifies():
    verify(parse_module(STEP.replace("RESULTS", "f32[T, 4, 6], f32[NB, 4, 2, 8], f32[NB, 4, 2, 6]")
                        .replace("RETURNED", "%out, %kp, %vp")))


def test_reading_a_pool_after_its_update_is_rejected():
    text = STEP.replace("RESULTS", "f32[T, 4, 6], f32[NB, 4, 2, 8]").replace("RETURNED", "%out, %k_pool")
    with pytest.raises(VerifyError, match="KV pool that .*kv_append.* already updated"):
        verify(parse_module(text))


def test_mismatched_pools_are_type_errors():
    text = STEP.replace("%v_pool: f32[NB, 4, 2, 6]", "%v_pool: f32[NB, 8, 2, 6]").replace(
        "f32[NB, 4, 2, 8], f32[NB, 4, 2, 6] = ", "").replace("RESULTS", "f32[T, 4, 6]").replace("RETURNED", "%out")
    with pytest.raises(VerifyError, match="block size"):
        verify(parse_module(text))


def test_query_start_must_have_one_more_entry():
    text = (STEP.replace("%starts: i64[B + 1]", "%starts: i64[B]")
            .replace("RESULTS", "f32[T, 4, 6], f32[NB, 4, 2, 8], f32[NB, 4, 2, 6]").replace("RETURNED", "%out, %kp, %vp"))
    with pytest.raises(VerifyError, match="one more entry"):
        verify(parse_module(text))


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 20.0)])
def test_paged_meaning_equals_per_sequence_attention(window, softcap):
    """Three sequences with different histories in one batch, blocks scattered over the pool."""
    g = torch.Generator().manual_seed(1)
    bs, hq, hkv, d, dv, nb = 4, 6, 2, 8, 5, 40
    history, new = [7, 0, 12], [1, 9, 4]  # cached tokens before this step, tokens in this step
    k_pool, v_pool = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, dv, generator=g)
    free = torch.randperm(nb, generator=g).tolist()
    tables = torch.zeros(3, 5, dtype=torch.int64)
    caches, queries, keys, values, slots = [], [], [], [], []
    for b in range(3):
        total = history[b] + new[b]
        blocks = [free.pop() for _ in range(-(-total // bs))]
        tables[b, :len(blocks)] = torch.tensor(blocks)
        k_all, v_all = torch.randn(total, hkv, d, generator=g), torch.randn(total, hkv, dv, generator=g)
        pos = torch.arange(total)
        slot = torch.tensor(blocks)[pos // bs] * bs + pos % bs
        k_pool, v_pool = kv_append_reference(k_pool, v_pool, k_all[:history[b]], v_all[:history[b]], slot[:history[b]])
        keys.append(k_all[history[b]:]), values.append(v_all[history[b]:]), slots.append(slot[history[b]:])
        queries.append(torch.randn(new[b], hq, d, generator=g))
        cache = KVCache()
        cache.write(0, pos[:history[b]], k_all[:history[b]], v_all[:history[b]])
        caches.append((cache, pos[history[b]:]))
    # a padding token at the end (slot -1, owned by no sequence)
    q = torch.cat(queries + [torch.randn(1, hq, d, generator=g)])
    k = torch.cat(keys + [torch.randn(1, hkv, d, generator=g)])
    v = torch.cat(values + [torch.randn(1, hkv, dv, generator=g)])
    slot_mapping = torch.cat(slots + [torch.tensor([-1])])
    before = k_pool.clone()
    k_pool, v_pool = kv_append_reference(k_pool, v_pool, k, v, slot_mapping)
    assert int((k_pool != before).any(-1).any(-1).sum()) == sum(new)  # the padding token wrote nothing
    starts = torch.tensor([0, 1, 10, 14])
    lens = torch.tensor([h + n for h, n in zip(history, new)])
    out = paged_attention_reference(q, k_pool, v_pool, tables, lens, starts, 0.3, window, softcap)
    for b in range(3):
        cache, pos = caches[b]
        want = attention_reference(queries[b], keys[b], values[b], pos, cache, 0, 0.3, window, softcap)
        torch.testing.assert_close(out[starts[b]:starts[b + 1]], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[14:], torch.zeros_like(out[14:]))


def test_slots_outside_the_pool_are_errors():
    k_pool, v_pool = torch.zeros(2, 4, 1, 2), torch.zeros(2, 4, 1, 2)
    with pytest.raises(InterpreterError, match="outside the KV pool"):
        kv_append_reference(k_pool, v_pool, torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.tensor([8]))
