"""Tool calling for chat: the model's chat template renders the tools, and the model answers
with calls in its family's format, which this module finds in the text (``tool_choice``
"auto") or imposes with a grammar (``tool_choice`` "required" or a named function, through
structured output).

Open models write tool calls in one of a few formats, and the chat template says which (it
renders past calls the same way). Three are recognized, as vLLM's parsers of the same names:

- ``hermes`` (Qwen 2.5/3, Hermes, SmolLM3 and most recent models):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block a call;
- ``llama3_json`` (Llama 3.1-3.3): the answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``, several separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (call ids of 9 letters
  and digits, which its template checks);
- ``qwen3_xml`` (Qwen3-Coder, Qwen3.5): ``<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n
  </parameter>\n...</function>\n</tool_call>``, each value raw text (strings) or JSON.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .structured import JSON_OPTIONS

FORMATS = ("hermes", "llama3_json", "mistral", "qwen3_xml")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolError(ValueError):
    """A tools or tool_choice value that cannot be used; the message says why."""


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def as_openai(self, fmt: str = "hermes") -> dict:
        """OpenAI's form; the id is one the format's template takes back in a later turn."""
        call_id = uuid.uuid4().hex[:9] if fmt == "mistral" else f"call_{uuid.uuid4().hex[:24]}"
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def detect_format(chat_template: Optional[str]) -> Optional[str]:
    """The tool-call format a chat template renders, or None when it renders no tools."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<function=" in chat_template and "<parameter=" in chat_template:
        return "qwen3_xml"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if ("<|python_tag|>" in chat_template or "<|eom_id|>" in chat_template
            or ('"parameters"' in chat_template and "ipython" in chat_template)):  # Llama 3.1-3.3
        return "llama3_json"
    return None


def resolve_format(parser: str, chat_template: Optional[str]) -> Optional[str]:
    """The format to read calls in for ``--tool-call-parser`` (auto: the template's; none: no
    tool calls), or a ToolError naming the choices."""
    if parser == "auto":
        return detect_format(chat_template)
    if parser == "none":
        return None
    if parser not in FORMATS:
        raise ToolError(f"unknown tool-call parser {parser!r}; expected auto, none or one of {', '.join(FORMATS)}")
    return parser


def check_tools(tools: Any) -> list[dict]:
    """OpenAI's ``tools``: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?}}; returns it with every function's parameters (default: any object)."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in names:
            raise ToolError(f"tools[{i}]: the function name {name!r} is given twice")
        names.add(name)
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON Schema object")
    return tools


def chosen_tools(tools: list[dict], tool_choice: Any) -> tuple[str, list[dict]]:
    """("none" | "auto" | "required", the tools a forced call may use) for ``tool_choice``."""
    if tool_choice is None:
        return "auto", tools
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, tools
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict):
        raise ToolError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                        "{'name': ...}}")
    named = [t for t in tools if t["function"]["name"] == fn.get("name")]
    if not named:
        raise ToolError(f"tool_choice names the function {fn.get('name')!r}, which is not among the tools")
    return "required", named


def call_grammar(fmt: str, tools: list[dict], parallel: bool = True) -> str:
    """A Lark grammar (llguidance's, with %json) whose sentences are one or more calls of
    ``tools`` in format ``fmt`` (exactly one unless ``parallel``), each call's arguments
    following its function's parameters."""
    more = ' ("\\n" call)*' if parallel else ""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               key: t["function"].get("parameters", {"type": "object"})},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    one = {"anyOf": calls, "x-guidance": JSON_OPTIONS} if len(calls) > 1 else {**calls[0], "x-guidance": JSON_OPTIONS}
    if fmt == "hermes":
        return f'start: call{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json ' + json.dumps(one)
    if fmt == "llama3_json":
        return "start: body\nbody: %json " + json.dumps(one)
    if fmt == "mistral":
        many = {"type": "array", "items": {k: v for k, v in one.items() if k != "x-guidance"}, "minItems": 1,
                **({} if parallel else {"maxItems": 1}), "x-guidance": JSON_OPTIONS}
        return 'start: "[TOOL_CALLS]" body\nbody: %json ' + json.dumps(many)
    if fmt == "qwen3_xml":
        return _xml_grammar(tools, more)
    raise ToolError(f"unknown tool-call format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _raw_text(schema: Any) -> bool:
    """Whether qwen3_xml writes a parameter's value as raw text: a string or an enum of strings."""
    if not isinstance(schema, dict):
        return False
    enum = schema.get("enum")
    return schema.get("type") == "string" or (bool(enum) and all(isinstance(v, str) for v in enum))


def _xml_grammar(tools: list[dict], more: str) -> str:
    """qwen3_xml calls: each tool's parameters in its schema's order (the required ones always),
    string values as one line of raw text without '<' (enums: one of their strings; a forced
    call cannot hold a multi-line string), the others as JSON of their schema."""
    rules, calls = [], []
    for t, tool in enumerate(tools):
        fn = tool["function"]
        schema = fn.get("parameters", {"type": "object"})
        required = set(schema.get("required", []))
        parts = []
        for a, (arg, sub) in enumerate((schema.get("properties") or {}).items()):
            value = f"v{t}_{a}"
            if _raw_text(sub) and "enum" in sub:
                rules.append(f"{value}: " + " | ".join(json.dumps(v, ensure_ascii=False) for v in sub["enum"]))
            elif _raw_text(sub):  # one line: the lexer takes the longest match, and would take the "\n" too
                low, high = max(1, int(sub.get("minLength", 1))), sub.get("maxLength")
                rules.append(f"{value}: /[^<\\n]{{{low},{'' if high is None else int(high)}}}/")
            else:
                rules.append(f"{value}: %json " + json.dumps({**(sub if isinstance(sub, dict) else {}),
                                                                 "x-guidance": JSON_OPTIONS}))
            part = f'"<parameter={arg}>\\n" {value} "\\n</parameter>\\n"'
            parts.append(part if arg in required else f"({part})?")
        rules.append(f'c{t}: "<tool_call>\\n<function={fn["name"]}>\\n" {" ".join(parts)} '
                     f'"</function>\\n</tool_call>"')
        calls.append(f"c{t}")
    call = " | ".join(calls)
    return f"start: call{more}\ncall: " + call + "\n" + "\n".join(rules)


def _xml_calls(text: str, tools: Optional[list[dict]]) -> Optional[list[ToolCall]]:
    """The calls of a qwen3_xml answer; a value is JSON unless its parameter is a string (by
    the tool's schema) or it does not parse as JSON."""
    schemas = {t["function"]["name"]: (t["function"].get("parameters") or {}).get("properties") or {}
               for t in tools or []}
    calls = []
    for body in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S):
        m = re.fullmatch(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", body, flags=re.S)
        if m is None:
            return None
        name, args = m.group(1).strip(), {}
        for arg, value in re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), flags=re.S):
            try:
                args[arg.strip()] = value if _raw_text(schemas.get(name, {}).get(arg.strip())) else json.loads(value)
            except ValueError:
                args[arg.strip()] = value
        calls.append(ToolCall(name, args))
    return calls or None


def _call(obj: Any, key: str) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _json_values(text: str) -> Optional[list]:
    """The JSON values ``text`` is made of (separated by whitespace or ';'); None if it is not."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def parse(fmt: str, text: str, tools: Optional[list[dict]] = None) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a model's answer. No calls (or calls that do not parse): the whole
    text is content. With calls, the content is what came before them (None if nothing).
    ``tools`` types qwen3_xml's values."""
    if fmt == "qwen3_xml":
        start = text.find("<tool_call>")
        calls = _xml_calls(text[start:], tools) if start >= 0 else None
        return (text[:start].strip() or None, calls) if calls else (text, [])
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], flags=re.S):
            values = _json_values(body.strip())
            call = _call(values[0], "arguments") if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start].strip() or None, calls
    if fmt == "llama3_json":
        body = text.strip()
        body = body[len("<|python_tag|>"):] if body.startswith("<|python_tag|>") else body
        values = _json_values(body) if body.startswith("{") else None
        calls = [_call(v, "parameters") for v in values or []]
        return (None, calls) if calls and all(calls) else (text, [])
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        values = _json_values(text[start + len("[TOOL_CALLS]"):].strip()) if start >= 0 else None
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = [_call(v, "arguments") for v in items or []]
        return (text[:start].strip() or None, calls) if calls and all(calls) else (text, [])
    raise ToolError(f"unknown tool-call format {fmt!r}")


class StreamedAnswer:
    """One streamed choice's text, split into content to send now and calls found at the end:
    text that may begin a call is held back until it does or cannot."""

    def __init__(self, fmt: str, tools: Optional[list[dict]] = None):
        self.fmt = fmt
        self.tools = tools
        self.marker = {"hermes": "<tool_call>", "qwen3_xml": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(fmt)
        self.text = ""
        self.sent = 0          # text[:sent] went out as content
        self.holding = False   # a call began (or may have): nothing more goes out until the end
        self.plain = False     # llama3_json: the answer did not start as a call, so it is all content

    def push(self, delta: str) -> str:
        """The content of ``delta`` that can go out now."""
        self.text += delta
        if self.holding:
            return ""
        if self.marker is None and not self.plain:  # llama3_json: a call is the whole answer
            lead = self.text.lstrip()
            if lead.startswith("{") or lead.startswith("<|python_tag|>"):
                self.holding = True
                return ""
            if not lead or "<|python_tag|>".startswith(lead):
                return ""  # undecided yet
            self.plain = True
        if self.marker is not None:
            found = self.text.find(self.marker, self.sent)
            if found >= 0:
                out, self.sent, self.holding = self.text[self.sent:found], found, True
                return out
            tail = self.text[self.sent:]
            keep = next((k for k in range(min(len(self.marker) - 1, len(tail)), 0, -1)
                         if self.marker.startswith(tail[-k:])), 0)  # may be the marker's beginning
        else:
            keep = 0
        out, self.sent = self.text[self.sent:len(self.text) - keep], len(self.text) - keep
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls) once the answer is complete."""
        _, calls = parse(self.fmt, self.text, self.tools)
        return ("", calls) if calls else (self.text[self.sent:], [])


__all__ = ["FORMATS", "StreamedAnswer", "ToolCall", "ToolError", "call_grammar", "check_tools", "chosen_tools",
           "resolve_format",
           "detect_format", "parse"]
