"""Sampling features beyond the basics: the nucleus without a full sort, OpenAI penalties,
logprobs, the batched path, and parameter validation of the new fields."""

import numpy as np
import pytest

from llmc.runtime.sampler import Sampler, SamplingParams, sample_batch, top_indices


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_matches_a_full_sort(top_p):
    rng = np.random.default_rng(0)
    probs = np.exp(rng.normal(size=2000) * 0.3)  # flat: the nucleus holds far more than 64 tokens
    chosen, kept = Sampler(SamplingParams(temperature=1.0, top_p=top_p))._nucleus(None, probs)
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    want = order[:int(np.searchsorted(cumulative, top_p * probs.sum())) + 1]
    assert chosen.tolist() == want.tolist() and np.allclose(kept, probs[want])


def test_top_indices_orders_without_sorting_everything():
    values = np.array([0.5, 2.0, 2.0, -1.0, 3.0])
    assert top_indices(values, 3).tolist() == [4, 1, 2]


def test_presence_and_frequency_penalties():
    logits = np.array([3.0, 2.9, 0.0])
    s = Sampler(SamplingParams(presence_penalty=0.5))
    assert s.sample(logits, [0], [0]) == 1
    # frequency scales with the count: one earlier use of 0 is not enough at 0.05, three are
    s = Sampler(SamplingParams(frequency_penalty=0.05))
    assert s.sample(logits, [0], [0]) == 0 and s.sample(logits, [0, 0, 0], [0, 0, 0]) == 1
    # penalties look at the output only, repetition at prompt and output
    assert Sampler(SamplingParams(presence_penalty=2.0)).sample(logits, [0], []) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5)).sample(logits, [0], []) == 1


def test_logit_bias_moves_greedy_and_drawn_tokens_alike():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 300)).astype(np.float32)
    top = int(np.argmax(logits[0]))
    params = [SamplingParams(logit_bias={7: 100.0}), SamplingParams(logit_bias={top: -100.0}),
              SamplingParams(temperature=1.0, seed=1, logit_bias={9: 100.0, 10_000: 5.0})]  # 10_000: past the vocab
    batched = sample_batch([Sampler(p) for p in params], np.stack([logits[0]] * 3), [[]] * 3, [[]] * 3)
    assert [s.token for s in batched][0::2] == [7, 9] and batched[1].token not in (top,)
    lp = Sampler(SamplingParams(logprobs=1, logit_bias={7: 100.0})).sample_full(logits[0])
    assert lp.token == 7 and lp.logprob > -1e-6  # logprobs see the biased logits, as with penalties


def test_batched_sampling_equals_one_by_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(logprobs=2),
              SamplingParams(temperature=1.2, top_k=5, seed=4), SamplingParams(repetition_penalty=1.3),
              SamplingParams(temperature=1.0, min_p=0.1, top_p=0.8, seed=5)]
    hist = [[1, 2, int(np.argmax(logits[4]))]] * 6
    batched = sample_batch([Sampler(p) for p in params], logits, hist, hist)
    alone = [Sampler(p).sample_full(logits[b], hist[b], hist[b]) for b, p in enumerate(params)]
    assert [s.token for s in batched] == [s.token for s in alone]
    assert batched[4].token != int(np.argmax(logits[4]))
    assert len(batched[2].top_logprobs) == 2 and batched[2].top_logprobs[0][0] == batched[2].token


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("stop", [""]), ("stop", 5), ("logprobs", 21),
    ("logprobs", -1), ("logit_bias", {1: 101}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
    ("logit_bias", [1]),
])
def test_new_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_inverse_cdf_equals_a_full_scan():
    """The blocked search (vocabularies over 4096) picks the index a plain cumulative sum does,
    and never a zero-weight token (min-p zeroes most of a row)."""
    from llmc.runtime.sampler import inverse_cdf

    rng = np.random.default_rng(7)
    for n in (5000, 49152, 3 * 1024 + 17):
        w = np.exp(rng.normal(size=n) * 2).astype(np.float32)
        w[rng.random(n) < 0.7] = 0.0
        cumulative = np.cumsum(w, dtype=np.float64)
        for u in np.concatenate([rng.random(200), [0.0, 1.0 - 1e-12]]):
            want = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), n - 1)
            while w[want] == 0:
                want -= 1
            got = inverse_cdf(w, float(u))
            assert w[got] > 0
            # the same token, unless u falls within float rounding of a boundary
            assert got == want or abs(cumulative[got] - u * cumulative[-1]) < 1e-9 * cumulative[-1] \
                or abs(cumulative[want] - u * cumulative[-1]) < 1e-9 * cumulative[-1]


def test_batched_draws_equal_one_by_one_on_a_full_vocabulary():
    """Rows drawn together (draw_rows) get the tokens each request draws alone, seeded, over a
    vocabulary the blocked inverse CDF handles; the request's generator advances once per token."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(5, 49152)) * 3).astype(np.float32)
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.0, top_k=40, seed=2),
              SamplingParams(temperature=0.7, top_p=0.9, seed=3), SamplingParams(temperature=1.1, min_p=0.05, seed=4),
              SamplingParams(temperature=0.9, repetition_penalty=1.2, seed=5)]
    hist = [[3, 4, 5]] * 5
    batch_samplers = [Sampler(p) for p in params]
    alone_samplers = [Sampler(p) for p in params]
    for _ in range(3):
        batched = sample_batch(batch_samplers, logits, hist, hist)
        alone = [s.sample_full(logits[b], hist[b], hist[b]) for b, s in enumerate(alone_samplers)]
        assert [s.token for s in batched] == [s.token for s in alone]
    # a temperature draw is not the argmax on this flat a row
    assert any(s.token != int(np.argmax(logits[b])) for b, s in enumerate(batched))
