"""The server with the official openai client, over the fake executor (no compile, seconds):
completions, chat, streaming, stop strings, max_tokens, seeds, logprobs, concurrency with and
without preemption, prefix reuse, every 4xx case, API keys, disconnects."""

import concurrent.futures as cf
import http.client
import json
import time

import openai
import pytest

from tests.runtime.fake import alone_reference
from tests.server.helpers import fake_server


def expected_text(tok, prompt: str, max_tokens: int) -> str:
    ids = alone_reference(tok.encode(prompt), max_tokens)
    return tok.decode([i for i in ids if i != 0])


def test_completion_returns_the_models_greedy_text(client, byte_tokenizer):
    r = client.completions.create(model="fake", prompt="Hello there", max_tokens=20, temperature=0)
    assert r.choices[0].text == expected_text(byte_tokenizer, "Hello there", 20)
    assert r.usage.prompt_tokens == len(byte_tokenizer.encode("Hello there"))
    assert r.usage.completion_tokens == len(alone_reference(byte_tokenizer.encode("Hello there"), 20))
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_template(client, byte_tokenizer):
    r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       temperature=0)
    prompt = byte_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(byte_tokenizer, prompt, 12)
    assert r.usage.prompt_tokens == len(byte_tokenizer.encode(prompt, add_special_tokens=False))


def test_streamed_chunks_reassemble_the_text(client):
    plain = client.completions.create(model="fake", prompt="Stream me", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="fake", prompt="Stream me", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=20,
                                          temperature=0)
    parts = list(client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=20, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_stop_strings_and_max_tokens(client):
    full = client.completions.create(model="fake", prompt="abc", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:13]
    r = client.completions.create(model="fake", prompt="abc", max_tokens=40, temperature=0, stop=[stop, "@@@@"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="fake", prompt="abc", max_tokens=40, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.index(stop)]
    r = client.completions.create(model="fake", prompt="abc", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_seed_reproducibility(client):
    def run(seed):
        return client.completions.create(model="fake", prompt="seed", max_tokens=30, temperature=1.0, top_p=0.95,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_logprobs(client, byte_tokenizer):
    r = client.completions.create(model="fake", prompt="lp", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text  # ASCII bytes: one character per token
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])  # greedy = the top one
    c = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "q"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and len(content[0].top_logprobs) == 2


def test_sixteen_concurrent_greedy_requests_equal_alone(live, client):
    prompts = ["p" * (1 + 9 * i) + str(i) for i in range(16)]

    def ask(p):
        return client.completions.create(model="fake", prompt=p, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    alone = [ask(p) for p in prompts]
    steps = live.engine.steps
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert live.engine.steps - steps < 16 * 24  # they really shared steps
    live.wait_idle()


def test_tiny_pool_preempts_and_metrics_show_it(byte_tokenizer):
    prompts = ["q" * (10 + 7 * i) for i in range(16)]
    with fake_server(tokenizer=byte_tokenizer, num_blocks=48, max_model_len=192, max_num_seqs=16,
                     max_num_batched_tokens=64, enable_prefix_caching=False) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        def ask(p):
            return client.completions.create(model="fake", prompt=p, max_tokens=32, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
        alone = [ask(p) for p in prompts]
        assert s.metrics()["llmc_preemptions_total"] == 0
        with cf.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone
        m = s.wait_idle()
        assert m["llmc_preemptions_total"] > 0


def test_prefix_reuse_hits_the_cache_and_cuts_ttft(byte_tokenizer):
    shared = "A long shared system prompt. " * 8  # 232 tokens
    with fake_server(tokenizer=byte_tokenizer, num_blocks=256, max_model_len=512, delay_per_token=0.002,
                     delay_per_step=0.0) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

        def ttft(prompt):
            t0 = time.perf_counter()
            stream = client.completions.create(model="fake", prompt=prompt, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            first, text, usage = None, "", None
            for c in stream:
                if first is None:
                    first = time.perf_counter() - t0
                text += "".join(ch.text for ch in c.choices)
                usage = c.usage or usage
            return first, text, usage
        cold, _, u1 = ttft(shared + "first question")
        warm, text, u2 = ttft(shared + "second question")
        m = s.metrics()
        assert u1.prompt_tokens_details.cached_tokens == 0 and u2.prompt_tokens_details.cached_tokens >= 224
        assert m["llmc_prefix_cache_hits_total"] >= 56 and m["llmc_prefix_cache_hit_rate"] > 0
        assert text == expected_text(byte_tokenizer, shared + "second question", 8)
        assert warm < cold / 2, (cold, warm)
        # the same prompt again: its partly filled last block is copied too (copy on write)
        _, again, u3 = ttft(shared + "second question")
        assert again == text
        assert u3.prompt_tokens_details.cached_tokens == u3.prompt_tokens - 1
        assert s.metrics()["llmc_prefix_cache_partial_hits_total"] >= 1


BAD = [
    (b'{"model": "fake", "prompt": "x"', 400, None),  # malformed JSON
    ({"prompt": "x"}, 400, "model"),  # missing field
    ({"model": "fake", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),  # wrong type
    ({"model": "fake", "prompt": 5}, 400, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "fake", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x" * 300}, 400, "prompt"),  # longer than the context
    ({"model": "fake", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "fake", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "fake", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "fake", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": "fake", "prompt": []}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_openai_errors(live, body, status, param):
    code, text = live.post("/v1/completions", body)
    assert code == status, text
    error = json.loads(text)["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] and error["param"].startswith(param), error
    assert live.get("/health")[0] == 200


def test_bad_chat_requests(live):
    for body, status in (({"model": "fake", "messages": []}, 400),
                         ({"model": "fake", "messages": [{"content": "no role"}]}, 400),
                         ({"model": "fake", "messages": "hi"}, 400),
                         ({"model": "fake", "messages": [{"role": "user", "content": "x" * 400}]}, 400)):
        code, text = live.post("/v1/chat/completions", body)
        assert code == status and "error" in json.loads(text), text


def test_oversized_body_and_unknown_route(live):
    code, text = live.post("/v1/completions", {"model": "fake", "prompt": "x" * (1 << 17)})
    assert code == 413 and json.loads(text)["error"]["code"] == "request_too_large"
    code, text = live.get("/v1/nothing")
    assert code == 404 and "error" in json.loads(text)
    assert live.get("/health")[0] == 200


def test_api_key(byte_tokenizer):
    with fake_server(api_key="sesame", tokenizer=byte_tokenizer) as s:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            code, text = s.post("/v1/completions", {"model": "fake", "prompt": "x"}, headers)
            assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert s.get("/v1/models")[0] == 401
        assert s.post("/tokenize", {"prompt": "x"})[0] == 401  # vLLM's extra routes are guarded too
        assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200  # not under /v1
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.models.list().data[0].id == "fake"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_client_disconnect_mid_stream_frees_blocks(byte_tokenizer):
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, delay_per_step=0.01) as s:
        host, port = s.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = json.dumps({"model": "fake", "prompt": "disconnect " * 4, "max_tokens": 200, "stream": True,
                           "temperature": 0, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.fp.readline()  # the first event arrived: the request holds blocks now
        m = s.metrics()
        assert m["llmc_requests_running"] == 1 and m["llmc_kv_blocks_used"] > 0
        conn.sock.close()
        conn.close()
        m = s.wait_idle(5.0)
        assert m["llmc_generation_tokens_total"] < 200  # stopped early
        s.engine.blocks.check()


def test_client_disconnect_without_streaming_frees_blocks(byte_tokenizer):
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, delay_per_step=0.01) as s:
        host, port = s.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = json.dumps({"model": "fake", "prompt": "bye", "max_tokens": 200, "temperature": 0, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        deadline = time.monotonic() + 5
        while s.metrics()["llmc_kv_blocks_used"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        conn.sock.close()
        m = s.wait_idle(5.0)
        assert m["llmc_generation_tokens_total"] < 200


def test_without_a_tokenizer_token_id_prompts_still_work():
    with fake_server() as s:
        code, text = s.post("/v1/completions", {"model": "fake", "prompt": [5, 6, 7], "max_tokens": 4,
                                                "temperature": 0, "logprobs": 0, "ignore_eos": True})
        assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
        code, text = s.post("/v1/completions", {"model": "fake", "prompt": "text", "max_tokens": 4})
        assert code == 400 and "token ids" in json.loads(text)["error"]["message"]
        code, text = s.post("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert code == 400 and "no tokenizer" in json.loads(text)["error"]["message"]
