"""Prompt logprobs (scoring a prompt) over the fake executor: each prompt token's logprob, rank
and top alternatives equal the fake's own function of the tokens before it, whether the prompt
runs in one step or in chunks, beside other requests, after a prefix other requests cached,
or through preemption; ``max_tokens=0`` scores without generating."""

import numpy as np
import pytest

from llmc.runtime.engine import Engine
from llmc.runtime.sampler import SamplingParams, log_softmax
from tests.runtime.fake import FakeExecutor, make_tokenizer

PROMPTS = [[(13 * i + 7 * j) % 250 + 1 for j in range(5 + 9 * i)] for i in range(6)]  # 5..50 tokens


def expected(prompt, k):
    """(logprob, rank, top k) of prompt[p] for p >= 1, straight from the fake's logits."""
    fake = FakeExecutor()
    out = [None]
    for p in range(1, len(prompt)):
        lp = log_softmax(fake.logits_for(np.asarray(prompt[:p])).astype(np.float64))
        token = prompt[p]
        top = sorted(range(lp.size), key=lambda i: (-lp[i], i))[:k]
        out.append((lp[token], int((lp > lp[token]).sum()) + 1, top))
    return out


def check(prompt, got, k):
    assert got[0] is None and len(got) == len(prompt)
    for p, (logprob, rank, top) in enumerate(expected(prompt, k)[1:], start=1):
        s = got[p]
        assert s.token == prompt[p]
        assert s.logprob == pytest.approx(logprob, abs=1e-4) and s.rank == rank
        assert [t for t, _ in s.top_logprobs] == top


def run(engine, prompts, params):
    reqs = [engine.add_request(p, params) for p in prompts]
    firsts, tokens, reasons = {}, {r.request_id: [] for r in reqs}, {}
    while engine.has_unfinished():
        for out in engine.iterate():
            if out.prompt_logprobs is not None:
                assert out.request_id not in firsts  # only on the first output
                firsts[out.request_id] = out.prompt_logprobs
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert engine.blocks.num_used == 0
    return [(firsts.get(r.request_id), tokens[r.request_id], reasons[r.request_id]) for r in reqs]


@pytest.mark.parametrize("budget", [512, 16])  # whole prompts in one step, or chunks of 16 tokens
def test_prompt_logprobs_equal_the_model_function(budget):
    engine = Engine(FakeExecutor(num_blocks=128), max_num_batched_tokens=budget)
    results = run(engine, PROMPTS, SamplingParams(max_tokens=3, prompt_logprobs=3, ignore_eos=True))
    for prompt, (scored, tokens, _) in zip(PROMPTS, results):
        check(prompt, scored, 3)
        assert len(tokens) == 3
    alone = run(Engine(FakeExecutor(num_blocks=128)), PROMPTS[:2], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [t for _, t, _ in results[:2]] == [t for _, t, _ in alone]  # generation is unchanged


def test_max_tokens_zero_scores_only():
    engine = Engine(FakeExecutor(num_blocks=64))
    (scored, tokens, reason), = run(engine, [PROMPTS[3]], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert tokens == [] and reason == "length"
    check(PROMPTS[3], scored, 0)


def test_scoring_ignores_the_prefix_cache_and_survives_preemption():
    engine = Engine(FakeExecutor(num_blocks=128))
    run(engine, [PROMPTS[5]], SamplingParams(max_tokens=2, ignore_eos=True))  # caches PROMPTS[5]'s blocks
    hits = engine.blocks.prefix_hits
    (scored, _, _), = run(engine, [PROMPTS[5]], SamplingParams(max_tokens=2, prompt_logprobs=1, ignore_eos=True))
    check(PROMPTS[5], scored, 1)
    assert engine.blocks.prefix_hits == hits  # computed, not taken from the cache
    small = Engine(FakeExecutor(num_blocks=20, block_size=4), max_num_batched_tokens=24, enable_prefix_caching=False)
    results = run(small, PROMPTS[2:], SamplingParams(max_tokens=8, prompt_logprobs=2, ignore_eos=True))
    assert small.scheduler.num_preemptions > 0
    for prompt, (scored, _, _) in zip(PROMPTS[2:], results):
        check(prompt, scored, 2)


def test_recurrent_models_refuse_prompt_logprobs(tmp_path):
    class StateFake(FakeExecutor):
        num_state_slots = 4

    engine = Engine(StateFake(), make_tokenizer(tmp_path), max_num_seqs=3)
    with pytest.raises(ValueError, match="recurrent state"):
        engine.add_request([1, 2, 3], SamplingParams(prompt_logprobs=1))
