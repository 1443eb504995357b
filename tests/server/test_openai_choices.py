"""Several choices per request with the official openai client, over the fake executor: ``n``
samples, several prompts in one completion request, streamed choices, their usage, prefix
sharing between the samples of a prompt, ``logit_bias``, and disconnects freeing every choice."""

import http.client
import json

import pytest

from tests.runtime.fake import VOCAB
from tests.server.helpers import fake_server


def sampled(client, prompt, seed, n=1, **kw):
    return client.completions.create(model="fake", prompt=prompt, max_tokens=20, temperature=1.0, seed=seed, n=n,
                                     extra_body={"ignore_eos": True}, **kw)


def test_n_samples_are_the_seeded_single_requests(client):
    r = sampled(client, "choose", 11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [sampled(client, "choose", 11 + s).choices[0].text for s in range(3)]
    assert [c.text for c in r.choices] == alone  # sample s draws from seed + s
    assert len(set(alone)) == 3
    assert r.usage.prompt_tokens == len("choose")  # the prompt once
    assert r.usage.completion_tokens == 3 * 20


def test_greedy_choices_agree(client):
    r = client.completions.create(model="fake", prompt="same", max_tokens=12, temperature=0, n=2)
    one = client.completions.create(model="fake", prompt="same", max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [one.choices[0].text] * 2


def test_streamed_choices_reassemble_per_index(client):
    plain = sampled(client, "stream n", 3, n=3)
    text, finish, usage = {}, {}, None
    for chunk in sampled(client, "stream n", 3, n=3, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
        usage = chunk.usage or usage
    assert [text[i] for i in range(3)] == [c.text for c in plain.choices]
    assert [finish[i] for i in range(3)] == ["length"] * 3
    assert usage.completion_tokens == plain.usage.completion_tokens and usage.prompt_tokens == len("stream n")


def test_several_prompts_in_one_request(client, byte_tokenizer):
    prompts = ["first prompt", "second, longer prompt"]
    r = sampled(client, prompts, 5, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt p, sample s: index p * n + s
    for p, prompt in enumerate(prompts):
        for s in range(2):
            assert r.choices[p * 2 + s].text == sampled(client, prompt, 5 + s).choices[0].text
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    ids = [byte_tokenizer.encode(p) for p in prompts]
    by_ids = sampled(client, ids, 5, n=2)  # lists of token ids
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]


def test_samples_of_a_prompt_prefill_it_once(live, client):
    prompt = "a prompt several blocks long, shared by every sample. " * 3  # 162 tokens: 10 full blocks
    before = live.metrics()
    r = sampled(client, prompt, 1, n=4)
    after = live.metrics()
    assert len(r.choices) == 4
    full_blocks = len(prompt) // live.engine.executor.block_size
    assert after["llmc_prefix_cache_hits_total"] - before["llmc_prefix_cache_hits_total"] >= 3 * full_blocks
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the first sample found nothing cached
    live.wait_idle()


def test_chat_n(client):
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="fake", messages=msgs, max_tokens=10, temperature=1.0, seed=9, n=2)
    alone = [client.chat.completions.create(model="fake", messages=msgs, max_tokens=10, temperature=1.0,
                                            seed=9 + s).choices[0].message.content for s in range(2)]
    assert [c.message.content for c in r.choices] == alone
    parts = {}
    roles = set()
    for chunk in client.chat.completions.create(model="fake", messages=msgs, max_tokens=10, temperature=1.0, seed=9,
                                                n=2, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1} and [parts[0], parts[1]] == alone


def test_logit_bias(client):
    greedy = client.completions.create(model="fake", prompt="bias", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    forced = client.completions.create(model="fake", prompt="bias", max_tokens=8, temperature=0,
                                       logit_bias={str(ord("z") + 1): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "z" * 8  # byte tokens: id = byte + 1
    banned = ord(greedy[0]) + 1
    avoided = client.completions.create(model="fake", prompt="bias", max_tokens=8, temperature=0,
                                        logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    assert greedy[0] not in avoided.choices[0].text
    drawn = sampled(client, "bias", 4, logit_bias={str(ord("q") + 1): 100})
    assert drawn.choices[0].text == "q" * 20


def test_echo(client, byte_tokenizer):
    plain = sampled(client, ["echo me", "and me"], 2, n=2)
    echoed = sampled(client, ["echo me", "and me"], 2, n=2, echo=True)
    assert [c.text for c in echoed.choices] == [p + c.text for p, c in zip(["echo me"] * 2 + ["and me"] * 2,
                                                                          plain.choices)]
    streamed = {}
    for chunk in sampled(client, "echo me", 2, echo=True, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed[0] == echoed.choices[0].text
    by_ids = sampled(client, byte_tokenizer.encode("echo me"), 2, echo=True)
    assert by_ids.choices[0].text == echoed.choices[0].text


def test_tokenize_and_detokenize(live, byte_tokenizer):
    code, text = live.post("/tokenize", {"model": "fake", "prompt": "Hello"})
    body = json.loads(text)
    assert code == 200 and body["tokens"] == byte_tokenizer.encode("Hello") and body["count"] == 5
    assert body["max_model_len"] == 256
    msgs = [{"role": "user", "content": "hi"}]
    code, text = live.post("/tokenize", {"messages": msgs})
    want = byte_tokenizer.encode(byte_tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert code == 200 and json.loads(text)["tokens"] == want
    chat = sampled_chat_usage(live, msgs)
    assert chat == len(want)  # what /tokenize counts is what a chat request's prompt costs
    code, text = live.post("/detokenize", {"tokens": byte_tokenizer.encode("round trip")})
    assert code == 200 and json.loads(text)["prompt"] == "round trip"
    for path, body, param in (("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"), ("/tokenize", {}, "prompt"),
                              ("/detokenize", {"tokens": [VOCAB]}, "tokens"),
                              ("/detokenize", {"tokens": "x"}, "tokens"),
                              ("/tokenize", {"model": "other", "prompt": "x"}, "model")):
        code, text = live.post(path, body)
        assert code in (400, 404) and json.loads(text)["error"]["param"] == param, (path, body, text)


def sampled_chat_usage(live, msgs) -> int:
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": msgs, "max_tokens": 1})
    return json.loads(text)["usage"]["prompt_tokens"]


BAD = [
    ({"n": 0}, "n"),
    ({"n": 65}, "n"),
    ({"prompt": ["x"] * 9, "n": 8}, "n"),  # 72 choices
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"),
    ({"echo": True, "logprobs": 1, "stream": True}, "stream"),  # prompt logprobs are not streamed
    ({"prompt_logprobs": 1, "stream": True}, "stream"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only scores: with echo or prompt_logprobs
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"suffix": "end"}, "suffix"),  # fields not implemented: refused, not silently ignored
    ({"best_of": 3}, "best_of"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_choice_requests(live, extra, param):
    code, text = live.post("/v1/completions", {"model": "fake", "prompt": "x", **extra})
    assert code == 400, text
    error = json.loads(text)["error"]
    assert error["param"] and error["param"].startswith(param), error
    assert live.get("/health")[0] == 200


def test_harmless_defaults_of_unimplemented_fields_pass(live):
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}, "user": "u1", "metadata": {"k": "v"}}
    code, text = live.post("/v1/chat/completions", body)
    assert code == 200, text
    code, text = live.post("/v1/chat/completions", {**body, "response_format": {"type": "json_schema"}})
    assert code == 400 and json.loads(text)["error"]["param"] == "response_format"


def test_concurrency_limit_answers_429_and_recovers(byte_tokenizer):
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, delay_per_step=0.01, max_concurrent=4) as s:
        host, port = s.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = {"model": "fake", "prompt": "busy", "max_tokens": 100, "stream": True, "n": 3, "temperature": 1.0,
                "ignore_eos": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # three choices running: one more fits, two do not
        other = http.client.HTTPConnection(host, int(port), timeout=10)
        other.request("POST", "/v1/completions", json.dumps({**body, "stream": False, "n": 2, "max_tokens": 2}),
                      {"content-type": "application/json"})
        refused = other.getresponse()
        assert refused.status == 429 and refused.getheader("retry-after") == "1"
        assert json.loads(refused.read())["error"]["code"] == "server_overloaded"
        code, _ = s.post("/v1/completions", {**body, "stream": False, "n": 1, "max_tokens": 2})
        assert code == 200
        assert s.metrics()["llmc_requests_rejected_total"] == 1
        conn.sock.close()
        conn.close()
        s.wait_idle(5.0)
        code, _ = s.post("/v1/completions", {**body, "stream": False, "n": 4, "max_tokens": 2})
        assert code == 200  # room again once the stream is gone


def test_disconnect_frees_every_choice(byte_tokenizer):
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, delay_per_step=0.01) as s:
        host, port = s.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = json.dumps({"model": "fake", "prompt": "many " * 4, "max_tokens": 200, "stream": True, "n": 3,
                           "temperature": 1.0, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event arrived: every choice has started
        assert s.metrics()["llmc_requests_running"] == 3
        conn.sock.close()
        conn.close()
        m = s.wait_idle(5.0)
        assert m["llmc_generation_tokens_total"] < 3 * 200
        s.engine.blocks.check()
