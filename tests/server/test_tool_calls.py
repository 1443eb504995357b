"""Tool calling through the server, with the official openai client over the fake executor and
a byte tokenizer whose chat template renders tools and calls the way Hermes-style templates do:
forced calls (tool_choice "required" or a named function) follow their tools' schemas,
streamed and not; calls the model writes on its own (tool_choice "auto") come back as
``tool_calls``; earlier calls and tool results render; bad tools are 400s."""

import json

import openai
import pytest

from llmc.runtime.tokenizer import Tokenizer
from tests.runtime.fake import EOS
from tests.server.helpers import fake_server

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

TEMPLATE = (
    "{% if tools %}<system>Tools:{% for t in tools %} {{ t['function'] | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_client(byte_tokenizer):
    tok = Tokenizer(byte_tokenizer.path, chat_template=TEMPLATE, eos_token=EOS, eos_token_ids=[0])
    with fake_server(tokenizer=tok, num_blocks=2048, max_model_len=1024, max_num_seqs=16,
                     max_num_batched_tokens=1024) as live:
        yield live, openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def streamed(client, **kw):
    """(content, tool call deltas, finish_reason) of a streamed chat completion."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return content, calls, finish


def check_calls(calls, allowed=("get_weather", "get_time")):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_calls_follow_the_schemas(tools_client):
    _, client = tools_client
    for seed in range(3):
        r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=1.0, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls)


def test_named_function_and_n_choices(tools_client):
    _, client = tools_client
    r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, max_tokens=300, temperature=1.0,
                                       seed=4, n=2, tool_choice={"type": "function",
                                                                 "function": {"name": "get_time"}})
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        check_calls(c.message.tool_calls, allowed=("get_time",))


def test_streamed_calls_equal_plain(tools_client):
    _, client = tools_client
    kw = dict(model="fake", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls
    content, calls, finish = streamed(client, **kw)
    assert content == "" and finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in plain]
    assert [c.index for c in calls] == list(range(len(calls)))


def test_auto_finds_calls_the_model_writes(tools_client):
    """The fake writes a call when a regex makes it (as a model would on its own)."""
    _, client = tools_client
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    regex = "Checking\\.\n" + call.replace("{", "\\{").replace("}", "\\}")
    for stream in (False, True):
        kw = dict(model="fake", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
                  extra_body={"structured_outputs": {"regex": regex}})
        if not stream:
            c = client.chat.completions.create(**kw).choices[0]
            content, calls, finish = c.message.content, c.message.tool_calls, c.finish_reason
        else:
            content, calls, finish = streamed(client, **kw)
        assert content.strip() == "Checking." and finish == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    plain = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_earlier_calls_and_results_render(tools_client):
    live, client = tools_client
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    code, text = live.post("/tokenize", {"messages": history})
    assert code == 200
    r = client.chat.completions.create(model="fake", messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    bad = [history[0], {**history[1], "tool_calls": [{"id": "c", "type": "function",
                                                      "function": {"name": "get_weather", "arguments": "{oops"}}]}]
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": bad, "tools": TOOLS})
    assert code == 400 and "not JSON" in text


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_tool_requests_are_400s(tools_client, extra, param):
    live, _ = tools_client
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": ASK, "max_tokens": 4, **extra})
    assert code == 400, text
    assert json.loads(text)["error"]["param"] == param


def test_a_template_without_tools_refuses_them(live):
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": ASK, "tools": TOOLS})
    assert code == 400 and json.loads(text)["error"]["param"] == "tools" and "renders no tools" in text
    code, text = live.post("/v1/chat/completions", {"model": "fake", "messages": ASK, "tools": TOOLS,
                                                    "tool_choice": "none", "max_tokens": 2})
    assert code == 200  # tool_choice none: nothing to parse
    code, text = live.post("/v1/completions", {"model": "fake", "prompt": "x", "tools": TOOLS})
    assert code == 400 and json.loads(text)["error"]["param"] == "tools"  # chat only


XML_TEMPLATE = (
    "{% if tools %}<system>Tools:{% for t in tools %} {{ t['function'] | tojson }}{% endfor %} Call as "
    "<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_qwen3_xml_calls_forced_and_typed(byte_tokenizer):
    tok = Tokenizer(byte_tokenizer.path, chat_template=XML_TEMPLATE, eos_token=EOS, eos_token_ids=[0])
    with fake_server(tokenizer=tok, num_blocks=2048, max_model_len=1024, max_num_batched_tokens=1024) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        days = {"type": "function", "function": {"name": "forecast", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                             "unit": {"enum": ["c", "f"]}},
            "required": ["city", "days", "unit"]}}}
        for seed in range(3):
            r = client.chat.completions.create(model="fake", messages=ASK, tools=[days], tool_choice="required",
                                               max_tokens=200, temperature=1.0, seed=seed, parallel_tool_calls=False)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message.content
            args = json.loads(c.message.tool_calls[0].function.arguments)
            assert isinstance(args["days"], int) and 1 <= args["days"] <= 9 and args["unit"] in ("c", "f")
            assert isinstance(args["city"], str) and args["city"]
