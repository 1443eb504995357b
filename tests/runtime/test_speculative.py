"""Speculative decoding with prompt-lookup drafts, over a fake model that mostly repeats itself:
the output equals plain greedy decoding token for token (stops, max_tokens, EOS and
preemption in the middle of a guess included) in fewer steps; only greedy requests guess, and
only while few requests run."""

import numpy as np
import pytest

from llmc.runtime.engine import Engine
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.speculative import MAX_WAIT, next_guess, propose
from tests.runtime.fake import Repeating, make_tokenizer, run_requests


PROMPTS = [[(3 * i + 11 * j) % 90 + 33 for j in range(4 + 6 * i)] for i in range(4)]


def run(engine, prompts, params):
    return run_requests(engine, prompts, params, check_blocks=True)


def engines(tok=None, max_seqs=2, **kw):
    plain = Engine(Repeating(num_blocks=256), tok, **kw)
    fast = Engine(Repeating(num_blocks=256), tok, speculative_tokens=4, speculative_max_seqs=max_seqs, **kw)
    return plain, fast


@pytest.mark.parametrize("concurrent", [1, 2])
def test_greedy_output_unchanged_in_fewer_steps(concurrent):
    plain, fast = engines()
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    for i in range(0, len(PROMPTS), concurrent):
        assert run(fast, PROMPTS[i:i + concurrent], params) == run(plain, PROMPTS[i:i + concurrent], params)
    assert fast.accepted_tokens > 0 and fast.draft_tokens > fast.accepted_tokens  # hits and misses
    assert fast.steps < 0.7 * plain.steps
    decode_rows = [s for s, t in fast.executor.batches if s > concurrent and s == t]
    assert decode_rows and max(decode_rows) <= concurrent * 5  # a guess is 4 tokens at most, beside the real one


def test_stops_inside_a_guess(tmp_path):
    tok = make_tokenizer(tmp_path)
    plain, fast = engines(tok, max_seqs=4)
    for params in (SamplingParams(max_tokens=23, ignore_eos=True),  # max_tokens lands inside guesses
                   SamplingParams(max_tokens=60),                  # EOS (token 0) may come up
                   SamplingParams(max_tokens=60, ignore_eos=True, stop=[tok.decode(PROMPTS[1][2:4])]),
                   SamplingParams(max_tokens=60, ignore_eos=True, stop_token_ids=[PROMPTS[2][3]])):
        assert run(fast, PROMPTS, params) == run(plain, PROMPTS, params), params
    assert fast.accepted_tokens > 0


def test_preemption_during_guesses():
    small = dict(enable_prefix_caching=False, max_num_batched_tokens=16)
    plain = Engine(Repeating(num_blocks=30, block_size=4), **small)
    fast = Engine(Repeating(num_blocks=30, block_size=4), speculative_tokens=4, speculative_max_seqs=4, **small)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    assert run(fast, PROMPTS, params) == run(plain, PROMPTS, params)
    assert fast.scheduler.num_preemptions > 0 and fast.accepted_tokens > 0


def test_only_greedy_requests_guess_and_only_few_at_once():
    _, fast = engines()
    run(fast, PROMPTS[:1], SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True))
    run(fast, PROMPTS[:1], SamplingParams(max_tokens=30, repetition_penalty=1.2, ignore_eos=True))
    run(fast, PROMPTS[:3], SamplingParams(max_tokens=30, ignore_eos=True))  # 3 running > speculative_max_seqs=2
    assert fast.draft_tokens == 0


def test_logprobs_of_guessed_tokens_equal_the_sampler_s():
    plain, fast = engines()
    params = SamplingParams(max_tokens=40, logprobs=3, ignore_eos=True)
    a, b = plain.add_request(PROMPTS[2], params), fast.add_request(PROMPTS[2], params)
    plain.run_to_completion()
    fast.run_to_completion()
    assert fast.accepted_tokens > 0 and b.output_ids == a.output_ids
    for x, y in zip(a.samples, b.samples):
        assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
        assert [t for t, _ in y.top_logprobs] == [t for t, _ in x.top_logprobs]
        assert [lp for _, lp in y.top_logprobs] == pytest.approx([lp for _, lp in x.top_logprobs], abs=1e-4)


def test_propose_finds_the_latest_repeat():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the latest occurrence wins
    assert propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]  # a 2-token tail when 3 never repeated
    assert propose([1, 2, 3, 4], 4) == [] and propose([1, 1], 2) == [] and propose([4, 5, 4, 5], 0) == []
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 400).tolist()
    for k in (1, 4, 8):
        draft = propose(tokens, k)
        assert len(draft) <= k


def test_guess_length_follows_what_held():
    assert next_guess(4, 4, 4, 0) == (4, 0, 0)   # all held: guess as long again (capped at 4)
    assert next_guess(4, 4, 2, 0) == (3, 0, 0)   # two held: one more than that
    assert next_guess(4, 3, 0, 0) == (1, 1, 1)   # none: one token, after a step's wait
    waits = []
    misses = 0
    for _ in range(6):
        _, misses, wait = next_guess(4, 1, 0, misses)
        waits.append(wait)
    assert waits == [1, 3, 7, MAX_WAIT, MAX_WAIT, MAX_WAIT]
    assert next_guess(4, 1, 1, 5) == (2, 0, 0)   # a hit ends the waiting
