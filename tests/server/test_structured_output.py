"""Structured output through the server, with the official openai client over the fake executor:
OpenAI's ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` and
``guided_*`` fields, for chat and completions, streamed and not, with n choices; and the 400s
for constraints that cannot be used."""

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"], "additionalProperties": False,
}


def chat(client, **kw):
    return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "a person, as JSON"}],
                                          max_tokens=150, **kw)


def test_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = chat(client, temperature=1.0, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_chat_json_object_and_streamed_schema(client):
    r = chat(client, temperature=1.0, seed=1, response_format={"type": "json_object"})
    text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    # any object: under the fake's random logits keys may outgrow max_tokens (then a prefix)
    assert isinstance(json.loads(text), dict) if reason == "stop" else text.startswith("{")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    plain = chat(client, temperature=0, response_format=fmt)
    text, finish = "", None
    for chunk in chat(client, temperature=0, response_format=fmt, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == plain.choices[0].message.content and finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_n_constrained_choices(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = chat(client, temperature=1.0, seed=7, n=3, response_format=fmt)
    texts = [c.message.content for c in r.choices]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 1


def test_completions_with_vllm_fields(client):
    def complete(**extra):
        return client.completions.create(model="fake", prompt="answer:", max_tokens=150, temperature=1.0, seed=2,
                                         extra_body=extra).choices[0]

    c = complete(structured_outputs={"regex": "[A-Z][a-z]{2,6} [0-9]{2}"})
    assert re.fullmatch("[A-Z][a-z]{2,6} [0-9]{2}", c.text) and c.finish_reason == "stop"
    assert complete(structured_outputs={"choice": ["left", "right"]}).text in ("left", "right")
    assert complete(guided_choice=["up", "down"]).text in ("up", "down")
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", complete(guided_regex=r"[0-9]+(\.[0-9]+)?").text)
    jsonschema.validate(json.loads(complete(guided_json=PERSON).text), PERSON)
    assert re.fullmatch(r"(ab)+", complete(structured_outputs={"grammar": 'start: ("ab")+'}).text)


def test_free_requests_unchanged_beside_constrained_ones(client):
    free = client.completions.create(model="fake", prompt="free text", max_tokens=20, temperature=0)
    again = client.completions.create(model="fake", prompt="free text", max_tokens=20, temperature=0,
                                      extra_body={"response_format": {"type": "text"}})
    assert free.choices[0].text == again.choices[0].text


BAD = [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"structured_outputs": {"regex": "([a-z]"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),  # two constraints
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_constraints_are_400s(live, extra, param):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        code, text = live.post(path, {"model": "fake", "max_tokens": 4, **body, **extra})
        assert code == 400, text
        error = json.loads(text)["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert live.get("/health")[0] == 200
