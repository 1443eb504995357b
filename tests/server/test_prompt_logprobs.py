"""Scoring prompts through the server, with the official openai client over the fake executor:
``echo`` with ``logprobs`` (OpenAI's legacy form, what lm-evaluation-harness's
``local-completions`` sends for loglikelihood tasks) and vLLM's ``prompt_logprobs``; the
figures equal the fake model's own function of the tokens before each position."""

import json

import numpy as np
import pytest

from llmc.runtime.sampler import log_softmax
from tests.runtime.fake import FakeExecutor


def model_logprobs(ids):
    """[None] + log p(ids[p] | ids[:p]) for p >= 1, from the fake's function."""
    fake = FakeExecutor()
    return [None] + [float(log_softmax(fake.logits_for(np.asarray(ids[:p])).astype(np.float64))[ids[p]])
                     for p in range(1, len(ids))]


def test_echo_with_logprobs_scores_the_prompt(client, byte_tokenizer):
    prompt = "Scoring a prompt."
    ids = byte_tokenizer.encode(prompt)
    r = client.completions.create(model="fake", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert c.logprobs.tokens == [byte_tokenizer.decode([i]) for i in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx(model_logprobs(ids)[1:], abs=1e-4)
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs[1:])
    assert c.logprobs.text_offset == list(range(len(prompt)))  # one byte a token
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_echo_with_logprobs_then_generation(client, byte_tokenizer):
    prompt = "Continue this"
    plain = client.completions.create(model="fake", prompt=prompt, logprobs=1, max_tokens=5, temperature=0)
    echoed = client.completions.create(model="fake", prompt=prompt, logprobs=1, max_tokens=5, temperature=0,
                                       echo=True, n=2)
    ids = byte_tokenizer.encode(prompt)
    for c in echoed.choices:
        assert c.text == prompt + plain.choices[0].text
        assert c.logprobs.token_logprobs[len(ids):] == plain.choices[0].logprobs.token_logprobs
        assert c.logprobs.token_logprobs[1:len(ids)] == pytest.approx(model_logprobs(ids)[1:], abs=1e-4)
        assert c.logprobs.text_offset[len(ids)] == len(prompt)


def test_loglikelihood_the_way_lm_eval_asks(client):
    """Token-id prompts (context + continuation), echo, logprobs=1, max_tokens=1, greedy: the
    continuation's logprob is the sum over its positions, as the harness computes it."""
    context, continuation = [5, 80, 81, 82, 33], [84, 85, 86]
    r = client.completions.create(model="fake", prompt=[context + continuation], echo=True, logprobs=1,
                                  max_tokens=1, temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    got = sum(lp.token_logprobs[len(context):len(context) + len(continuation)])
    assert got == pytest.approx(sum(model_logprobs(context + continuation)[len(context):]), abs=1e-3)
    assert len(lp.token_logprobs) == len(context) + len(continuation) + 1  # and the one generated token


def test_vllm_prompt_logprobs(live, byte_tokenizer):
    ids = byte_tokenizer.encode("vllm form")
    code, text = live.post("/v1/completions", {"model": "fake", "prompt": "vllm form", "max_tokens": 2,
                                               "temperature": 0, "prompt_logprobs": 3})
    assert code == 200, text
    scored = json.loads(text)["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    expected = model_logprobs(ids)
    for p in range(1, len(ids)):
        entry = scored[p][str(ids[p])]
        assert entry["logprob"] == pytest.approx(expected[p], abs=1e-4)
        assert entry["decoded_token"] == byte_tokenizer.decode([ids[p]]) and entry["rank"] >= 1
        assert sorted(e["rank"] for e in scored[p].values())[:3] == [1, 2, 3]  # the top 3, and the token
    messages = [{"role": "user", "content": "chat form"}]
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 1,
                                                    "prompt_logprobs": 0})
    assert code == 200, text
    chat_ids = byte_tokenizer.encode(byte_tokenizer.apply_chat_template(messages), add_special_tokens=False)
    scored = json.loads(text)["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(chat_ids)
    assert [scored[p][str(chat_ids[p])]["logprob"] for p in range(1, len(chat_ids))] == \
        pytest.approx(model_logprobs(chat_ids)[1:], abs=1e-4)
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": messages, "prompt_logprobs": 0,
                                                    "stream": True})
    assert code == 400 and json.loads(text)["error"]["param"] == "stream"
