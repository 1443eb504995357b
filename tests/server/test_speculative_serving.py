"""Speculative decoding behind the server (fake executor): greedy completions equal those of a
server that does not guess, streamed or not, and /metrics counts the guesses."""

import json

from tests.runtime.fake import Repeating
from tests.server.helpers import fake_server


def test_guessing_server_answers_as_the_plain_one(byte_tokenizer):
    body = {"model": "fake", "prompt": "a model that repeats itself", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, executor_class=Repeating) as s:
        code, plain = s.post("/v1/completions", body)
        assert code == 200
    with fake_server(tokenizer=byte_tokenizer, max_model_len=256, executor_class=Repeating,
                     speculative_tokens=4) as s:
        code, guessed = s.post("/v1/completions", body)
        assert code == 200
        assert _text(guessed) == _text(plain)
        code, streamed = s.post("/v1/completions", {**body, "stream": True})
        pieces = [line[6:] for line in streamed.splitlines() if line.startswith("data: {")]
        assert "".join(json.loads(p)["choices"][0]["text"] for p in pieces if json.loads(p)["choices"]) == \
            _text(plain)
        metrics = s.metrics()
        assert metrics["llmc_speculative_draft_tokens_total"] > 0
        assert 0 < metrics["llmc_speculative_accepted_tokens_total"] <= metrics["llmc_speculative_draft_tokens_total"]


def _text(body: str) -> str:
    return json.loads(body)["choices"][0]["text"]
