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
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .structured import JSON_OPTIONS

FORMATS = ("hermes", "llama3_json", "mistral")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolError(ValueError):
    """A tools or tool_choice value that cannot be used; the message says why."""


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def as_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def detect_format(chat_template: Optional[str]) -> Optional[str]:
    """The tool-call format a chat template renders, or None when it renders no tools."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "<|eom_id|>" in chat_template:
        return "llama3_json"
    return None


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


def call_grammar(fmt: str, tools: list[dict]) -> str:
    """A Lark grammar (llguidance's, with %json) whose sentences are one or more calls of
    ``tools`` in format ``fmt``, each call's arguments following its function's parameters."""
    key = "parameters" if fmt == "llama3_json" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               key: t["function"].get("parameters", {"type": "object"})},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    one = {"anyOf": calls, "x-guidance": JSON_OPTIONS} if len(calls) > 1 else {**calls[0], "x-guidance": JSON_OPTIONS}
    if fmt == "hermes":
        return ('start: call ("\\n" call)*\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json '
                + json.dumps(one))
    if fmt == "llama3_json":
        return "start: body\nbody: %json " + json.dumps(one)
    if fmt == "mistral":
        many = {"type": "array", "items": {k: v for k, v in one.items() if k != "x-guidance"}, "minItems": 1,
                "x-guidance": JSON_OPTIONS}
        return 'start: "[TOOL_CALLS]" body\nbody: %json ' + json.dumps(many)
    raise ToolError(f"unknown tool-call format {fmt!r}; expected one of {', '.join(FORMATS)}")


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


def parse(fmt: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a model's answer. No calls (or calls that do not parse): the whole
    text is content. With calls, the content is what came before them (None if nothing)."""
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

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.marker = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(fmt)
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
        _, calls = parse(self.fmt, self.text)
        return ("", calls) if calls else (self.text[self.sent:], [])


__all__ = ["FORMATS", "StreamedAnswer", "ToolCall", "ToolError", "call_grammar", "check_tools", "chosen_tools",
           "detect_format", "parse"]
