"""Scheduler and engine over the fake executor: batched results equal alone results (with
chunked prefill, preemption and prefix caching), stop conditions, logprobs, block accounting."""

import numpy as np
import pytest

from llmc.runtime.engine import Engine
from llmc.runtime.sampler import SamplingParams
from tests.runtime.fake import FakeExecutor, alone_reference, make_tokenizer

PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(3 + 5 * i)] for i in range(16)]  # 3..78 tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def run_all(engine, prompts, params):
    reqs = [engine.add_request(p, params if isinstance(params, SamplingParams) else params[i])
            for i, p in enumerate(prompts)]
    outputs = {r.request_id: [] for r in reqs}
    finish = {}
    while engine.has_unfinished():
        for out in engine.iterate():
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
        engine.blocks.check()
    assert engine.blocks.num_used == 0
    return [outputs[r.request_id] for r in reqs], [finish[r.request_id] for r in reqs]


def test_sixteen_greedy_requests_batched_equal_alone():
    engine = Engine(FakeExecutor(num_blocks=512), max_num_seqs=16, max_num_batched_tokens=64)
    got, _ = run_all(engine, PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert got == [alone_reference(p, 24, eos=-1) for p in PROMPTS]
    seqs = [s for s, _ in engine.executor.batches]
    assert max(seqs) == 16  # really batched
    assert max(t for _, t in engine.executor.batches) <= 64  # the budget held: prompts were chunked
    assert engine.scheduler.num_preemptions == 0


def test_tiny_pool_preempts_and_outputs_stay_the_same():
    engine = Engine(FakeExecutor(num_blocks=40), max_num_seqs=16, max_num_batched_tokens=64,
                    enable_prefix_caching=False)
    got, _ = run_all(engine, PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert got == [alone_reference(p, 24, eos=-1) for p in PROMPTS]


def test_seeded_sampling_does_not_depend_on_the_batch():
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=i, max_tokens=16, ignore_eos=True,
                             presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
              for i in range(len(PROMPTS))]
    batched, _ = run_all(Engine(FakeExecutor(num_blocks=40), max_num_seqs=16, max_num_batched_tokens=32),
                         PROMPTS, params)
    alone = [run_all(Engine(FakeExecutor()), [p], [params[i]])[0][0] for i, p in enumerate(PROMPTS[:4])]
    assert batched[:4] == alone
    assert len({tuple(b) for b in batched}) == len(batched)


def test_prefix_cache_hits_and_same_output():
    shared = list(range(1, 41))
    engine = Engine(FakeExecutor(num_blocks=64))
    first = run_all(engine, [shared + [50, 51]], SamplingParams(max_tokens=8, ignore_eos=True))[0][0]
    assert engine.blocks.prefix_hits == 0
    req = engine.add_request(shared + [60, 61, 62], SamplingParams(max_tokens=8, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.iterate()
    assert engine.blocks.prefix_hits == 10 and req.num_cached_prompt == 40
    assert outs[-1].cached_tokens == 40
    second = [t for o in outs for t in o.new_token_ids]
    assert second == alone_reference(shared + [60, 61, 62], 8, eos=-1)
    assert first == alone_reference(shared + [50, 51], 8, eos=-1)
    assert engine.executor.batches[-8][1] == 3  # only the new tokens were prefilled (then 7 decodes)


def test_max_tokens_eos_and_stop_ids(tok):
    prompt = tok.encode("abc")
    ref = alone_reference(prompt, 40)
    engine = Engine(FakeExecutor(), tok)
    (got,), (reason,) = run_all(engine, [prompt], SamplingParams(max_tokens=5, ignore_eos=True))
    assert got == ref[:5] and reason == "length"
    stop_id = ref[3]
    (got,), (reason,) = run_all(engine, [prompt], SamplingParams(max_tokens=40, stop_token_ids=[stop_id]))
    assert got == ref[:ref.index(stop_id) + 1] and reason == "stop"


def test_stop_strings_cut_the_text_and_streamed_pieces_agree(tok):
    engine = Engine(FakeExecutor(), tok)
    prompt = tok.encode("Once")
    full = "".join(o.text for o in engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True)))
    assert len(full) > 20
    stop = full[12:15]
    index = full.find(stop)
    pieces = list(engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=["zzzz", stop])))
    assert "".join(o.text for o in pieces) == full[:index]
    assert pieces[-1].finish_reason == "stop" and pieces[-1].completion_tokens < 40
    assert engine.blocks.num_used == 0


def test_logprobs_are_log_softmax_of_the_logits():
    engine = Engine(FakeExecutor())
    prompt = [5, 6, 7]
    outs = list(engine.generate(prompt, SamplingParams(max_tokens=3, logprobs=4, ignore_eos=True)))
    sample = outs[0].new_samples[0]
    logits = FakeExecutor().logits_for(np.asarray(prompt)).astype(np.float64)
    lp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert sample.token == int(np.argmax(logits))
    assert sample.logprob == pytest.approx(lp[sample.token])
    assert [t for t, _ in sample.top_logprobs] == np.argsort(-lp)[:4].tolist()
    assert sample.top_logprobs[0][1] == pytest.approx(lp.max())


def test_abort_frees_blocks_and_bad_prompts_are_refused():
    engine = Engine(FakeExecutor(max_model_len=64))
    req = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=50))
    engine.iterate()
    assert engine.blocks.num_used > 0
    engine.abort(req.request_id)
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()
    with pytest.raises(ValueError, match="at most 63"):
        engine.add_request(list(range(1, 65)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([300], SamplingParams())


def test_context_limit_ends_with_length():
    engine = Engine(FakeExecutor(max_model_len=32))
    (got,), (reason,) = run_all(engine, [list(range(1, 29))], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(got) == 4 and reason == "length"


def test_max_num_seqs_and_budget_bound_every_step():
    engine = Engine(FakeExecutor(num_blocks=512), max_num_seqs=4, max_num_batched_tokens=16)
    got, _ = run_all(engine, PROMPTS[:10], SamplingParams(max_tokens=6, ignore_eos=True))
    assert got == [alone_reference(p, 6, eos=-1) for p in PROMPTS[:10]]
    assert max(s for s, _ in engine.executor.batches) == 4
    assert max(t for _, t in engine.executor.batches) == 16


def test_stop_string_split_across_tokens_is_held_back(tok):
    from llmc.runtime.detokenizer import IncrementalText

    text = IncrementalText(tok, stop=["END"])
    pieces = [text.push(i) for i in tok.encode("abcEN")]
    assert "".join(pieces) == "abc"  # "EN" could start "END": held back
    assert text.push(tok.encode("D")[0]) == "" and text.stopped == "END"
    text = IncrementalText(tok, stop=["END"])
    pieces = [text.push(i) for i in tok.encode("abcENx")] + [text.finish()]
    assert "".join(pieces) == "abcENx" and text.stopped is None


def test_repeated_prompt_reuses_its_partly_filled_block():
    """42 tokens = 10 full blocks of 4 + 2: the repeat copies the partly filled block and
    computes only its last token; the output is unchanged."""
    prompt = list(range(1, 43))
    engine = Engine(FakeExecutor(num_blocks=64))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = run_all(engine, [prompt], params)[0][0]
    second = run_all(engine, [prompt], params)[0][0]
    assert first == second == alone_reference(prompt, 8, eos=-1)
    assert engine.blocks.partial_hits == 1 and len(engine.executor.copies) == 1
    assert engine.executor.batches[-8][1] == 1  # one prompt token computed (then 7 decodes)
    # batched: 8 requests at once, half of them repeats, all equal to alone
    prompts = [prompt[:5 + 3 * i] for i in range(8)]
    outs = run_all(engine, prompts + prompts[:4], params)[0]
    assert outs == [alone_reference(p, 8, eos=-1) for p in prompts + prompts[:4]]
