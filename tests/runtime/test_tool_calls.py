"""Tool calls: finding them in answers of each format, holding streamed text back only while it
may begin a call, the grammar that forces calls (checked with llguidance against every
format), and the checks of ``tools`` / ``tool_choice``."""

import json

import pytest

from llmc.runtime.tool_calls import (ToolError, StreamedAnswer, call_grammar, check_tools, chosen_tools,
                                     detect_format, parse)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

ANSWERS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>', "Let me check."),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {}}', None),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {}}]', None),
    "qwen3_xml": ('Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n'
                  '</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>',
                  "Let me check."),
}


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_calls_are_found_in_each_format(fmt):
    text, content = ANSWERS[fmt]
    got_content, calls = parse(fmt, text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    wire = calls[0].as_openai()
    assert wire["type"] == "function" and json.loads(wire["function"]["arguments"]) == {"city": "Paris"}
    assert wire["id"].startswith("call_")
    plain = "The weather in Paris is mild; no tool needed."
    assert parse(fmt, plain) == (plain, [])


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_broken_calls_stay_text(fmt):
    broken = {"hermes": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>",
              "llama3_json": '{"name": "get_weather", "parameters": [1, 2]}',
              "mistral": '[TOOL_CALLS]{"name": "get_weather"}',
              "qwen3_xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"}[fmt]
    assert parse(fmt, broken) == (broken, [])


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_streaming_holds_back_only_what_may_begin_a_call(fmt):
    text, content = ANSWERS[fmt]
    stream = StreamedAnswer(fmt)
    sent = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert rest == "" and len(calls) == 2
    assert sent.strip() == (content or "")
    plain = "Plain text with a < and a [ and { braces } in it."
    stream = StreamedAnswer(fmt)
    pieces = [stream.push(plain[i:i + 2]) for i in range(0, len(plain), 2)]
    rest, calls = stream.finish()
    assert "".join(pieces) + rest == plain and calls == []
    if fmt != "llama3_json":  # text goes out as it comes, except a possible marker's first characters
        assert len("".join(pieces)) >= len(plain) - 2


def test_templates_name_their_format():
    assert detect_format("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>") == "hermes"
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == "mistral"
    assert detect_format("{% if tools %}{{ '<|python_tag|>' }}{% endif %}") == "llama3_json"
    assert detect_format("{% if tools %}<tool_call>\n<function={{ name }}>\n<parameter={{ arg }}>"
                         "{% endif %}") == "qwen3_xml"
    assert detect_format('{% if tools %}{"name": function name, "parameters": ...}{% endif %}'
                         "<|start_header_id|>ipython") == "llama3_json"  # Llama 3.2: no python_tag
    assert detect_format("{{ messages }}") is None and detect_format(None) is None


def test_xml_values_follow_the_schema_types():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}, "n": {"type": "integer"}, "flags": {"type": "array"}, "level": {"enum": ["1", "2"]}}}}}]
    text = ("<tool_call>\n<function=f>\n<parameter=code>\n42\n</parameter>\n<parameter=n>\n42\n</parameter>\n"
            "<parameter=flags>\n[1, 2]\n</parameter>\n<parameter=level>\n2\n</parameter>\n</function>\n</tool_call>")
    _, calls = parse("qwen3_xml", text, tools)
    assert calls[0].arguments == {"code": "42", "n": 42, "flags": [1, 2], "level": "2"}


def test_mistral_call_ids_are_nine_letters_and_digits():
    from llmc.runtime.tool_calls import ToolCall

    call_id = ToolCall("f", {}).as_openai("mistral")["id"]
    assert len(call_id) == 9 and call_id.isalnum()


def test_tool_and_choice_checks():
    check_tools([WEATHER, TIME])
    for bad, match in (([], "non-empty"), ([{"type": "function"}], "tools\\[0\\]"),
                       ([{"type": "function", "function": {"name": "bad name"}}], "letters"),
                       ([WEATHER, WEATHER], "twice"),
                       ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "JSON Schema")):
        with pytest.raises(ToolError, match=match):
            check_tools(bad)
    assert chosen_tools([WEATHER, TIME], None) == ("auto", [WEATHER, TIME])
    assert chosen_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}) == \
        ("required", [TIME])
    with pytest.raises(ToolError, match="not among the tools"):
        chosen_tools([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ToolError, match="tool_choice must be"):
        chosen_tools([WEATHER], "sometimes")


@pytest.mark.parametrize("fmt", sorted(ANSWERS))
def test_call_grammars_accept_calls_and_nothing_else(fmt):
    llguidance = pytest.importorskip("llguidance")
    grammar = call_grammar(fmt, [WEATHER, TIME])
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    compact = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
               "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
               "qwen3_xml": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                            "<parameter=unit>\nf\n</parameter>\n</function>\n</tool_call>"}[fmt]
    wrong = compact.replace("get_weather", "get_wether")
    tok = llguidance.LLTokenizer(_byte_tokenizer_json())

    def accepts(text):
        m = llguidance.LLMatcher(tok, grammar)
        ok = all(m.consume_token(b + 1) for b in text.encode())
        return ok and m.is_accepting()

    assert accepts(compact) and not accepts(wrong) and not accepts("hello")
    assert parse(fmt, compact)[1][0].arguments["city"] == "Paris"


def _byte_tokenizer_json():
    import tempfile

    from tests.runtime.fake import make_tokenizer

    return make_tokenizer(tempfile.mkdtemp()).to_json()
