"""The OpenAI-compatible HTTP server (FastAPI + uvicorn; the ``serve`` extra).

Routes: ``/v1/completions``, ``/v1/chat/completions`` (the model's chat template), both with
``n`` samples (several prompts too, for completions; see choices.py) and server-sent-event
streaming in OpenAI's chunk format; ``/v1/models``; ``/health``; Prometheus
``/metrics``. Errors are OpenAI's error JSON. The kernels run on the engine thread
(async_engine.py); this module only parses, tokenizes and formats.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, ClassVar, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import choices as choices_
from .async_engine import AsyncEngine, EngineDeadError
from .metrics import ServerMetrics
from .sampler import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from .structured import GrammarError, grammar_from
from . import tool_calls as tools_

log = logging.getLogger("llmc.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_CONCURRENT = 256  # engine requests (choices) in flight before new requests get a 429
PROTECTED = ("/v1", "/tokenize", "/detokenize")  # the routes --api-key guards (not /health, /metrics)
MAX_CHOICES = 64  # choices one request may ask for: its prompts times n


# --- errors ----------------------------------------------------------------------------------
def error_response(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None) -> JSONResponse:
    headers = {"retry-after": "1"} if status == 429 else None  # overloaded: clients back off and retry
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


# --- request bodies --------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: Optional[dict[str, float]] = None
    # OpenAI fields this server does not implement: named in a 400 when they would change the
    # output, rather than silently ignored like unknown fields
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    # structured output (runtime/structured.py): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* fields
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    suffix: Any = None
    best_of: Any = None
    prompt_logprobs: Any = None

    IMPLEMENTED: ClassVar[tuple] = ()  # of the fields below, those a body type does honour

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server would not honour."""
        harmless = {"tools": lambda v: not v, "functions": lambda v: not v,
                    "tool_choice": lambda v: v in (None, "none", "auto"),
                    "function_call": lambda v: v in (None, "none", "auto"),
                    "suffix": lambda v: not v, "best_of": lambda v: v is None or v == self.n,
                    "prompt_logprobs": lambda v: v is None}
        return next((name for name, ok in harmless.items()
                     if name not in self.IMPLEMENTED and not ok(getattr(self, name))), None)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def constraint(self) -> Optional[tuple[str, str, Any]]:
        """The one output constraint the body asks for, as (field, kind, spec); None for none."""
        found = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind == "json_object":
                found.append(("response_format", "json_object", None))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict):
                    raise ApiError(400, "response_format.json_schema must be an object holding the schema under "
                                        "'schema'", "response_format")
                found.append(("response_format", "json_schema", spec.get("schema", {"type": "object"})))
            elif kind != "text":
                raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                                    f"{kind!r}", "response_format")
        outputs = self.structured_outputs
        if outputs is not None:
            if not isinstance(outputs, dict):
                raise ApiError(400, "structured_outputs must be an object (json, regex, choice, grammar or "
                                    "json_object)", "structured_outputs")
            kinds = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
            for key, value in outputs.items():
                if key in kinds and value is not None:
                    found.append(("structured_outputs", kinds[key], value))
                elif key == "json_object" and value:
                    found.append(("structured_outputs", "json_object", None))
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                found.append((name, kind, getattr(self, name)))
        if len(found) > 1:
            raise ApiError(400, f"the request asks for {len(found)} output constraints "
                                f"({', '.join(f[0] for f in found)}); give one", found[1][0])
        return found[0] if found else None


class CompletionBody(_Common):
    IMPLEMENTED: ClassVar[tuple] = ("prompt_logprobs",)

    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: score the prompt only (with echo or prompt_logprobs)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: per prompt token

    def scoring(self) -> Optional[int]:
        """How many alternatives a prompt token's logprobs carry, when the prompt is scored
        (``echo`` with ``logprobs``, or ``prompt_logprobs``); None when it is not."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(wanted) if wanted else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None                  # a tool message: the call it answers
    name: Optional[str] = None


class ChatBody(_Common):
    IMPLEMENTED: ClassVar[tuple] = ("tools", "tool_choice", "prompt_logprobs")

    messages: list[ChatMessage] = Field(min_length=1)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: the rendered prompt's
    parallel_tool_calls: Optional[bool] = None  # False: at most one tool call an answer
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class TokenizeBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    tokens: list[int]


def validation_message(exc: Union[RequestValidationError, ValidationError]) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}", param


# --- the app ---------------------------------------------------------------------------------
class Server:
    """Holds what the routes share: the engine, names, limits, metrics."""

    def __init__(self, engine: AsyncEngine, model_name: str, api_key: Optional[str] = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: Optional[ServerMetrics] = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT, tool_call_parser: str = "auto"):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or ServerMetrics(engine)
        self.tokenizer = engine.engine.tokenizer
        self.created = int(time.time())
        # the format tool calls take in this model's answers (runtime/tool_calls.py); None: no tools
        self.tool_format = tools_.resolve_format(tool_call_parser,
                                                 self.tokenizer.chat_template if self.tokenizer else None)

    # sampling parameters from a body
    def params(self, body: _Common, max_tokens: Optional[int], prompt_len: int,
               logprobs: Optional[int], grammar: Optional[str] = None,
               prompt_logprobs: Optional[int] = None) -> list[SamplingParams]:
        """The parameters of each of the body's n samples of one prompt: with a seed, sample s
        draws from seed + s (sample 0 is the n=1 request with that seed); ``grammar`` from
        ``grammar()``; ``prompt_logprobs`` for sample 0 only (the prompt is scored once; the
        other samples take its blocks from the prefix cache)."""
        limit = self.engine.engine.max_model_len
        room = limit - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                                f"{prompt_len} and max_tokens asks for {max_tokens} more ({prompt_len + max_tokens}); "
                                f"lower max_tokens or shorten the prompt", "max_tokens", "context_length_exceeded")
        bias = self.logit_bias(body)
        try:
            return [SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0,
                seed=None if body.seed is None else body.seed + s,
                max_tokens=max_tokens if max_tokens is not None else room, stop=body.stop or (),
                stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos, logprobs=logprobs,
                logit_bias=bias, grammar=grammar, prompt_logprobs=None if s else prompt_logprobs)
                for s in range(body.n)]
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def grammar(self, body: _Common, tool_grammar: Optional[str] = None) -> Optional[str]:
        """The llguidance grammar of the body's output constraint, checked against the model's
        tokenizer (a 400 naming the field when it cannot be used). Off the event loop: the first
        one builds the token table (~0.3 s) and a large schema compiles for a while.
        ``tool_grammar``: the calls a tool_choice forces (Lark), the constraint then."""
        found = body.constraint()
        if tool_grammar is not None:
            if found is not None:
                raise ApiError(400, f"tool_choice forces a tool call, which {found[0]} would constrain too; give one",
                               found[0])
            found = ("tool_choice", "grammar", tool_grammar)
        if found is None:
            return None
        field, kind, spec = found

        def build() -> str:
            grammar = grammar_from(kind, spec)
            self.engine.engine.check_grammar(grammar)
            return grammar

        try:
            return await asyncio.to_thread(build)
        except (GrammarError, ValueError) as exc:
            raise ApiError(400, f"{field}: {exc}", field) from None

    def logit_bias(self, body: _Common) -> Optional[dict[int, float]]:
        """OpenAI's ``logit_bias`` (token id strings -> [-100, 100]) as token ids, checked
        against the vocabulary."""
        if not body.logit_bias:
            return None
        vocab = self.engine.engine.vocab_size
        out = {}
        for key, value in body.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id", "logit_bias") from None
            if token < 0 or (vocab and token >= vocab):
                raise ApiError(400, f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})",
                               "logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ApiError(400, f"logit_bias: {value} for token {token} is outside "
                                    f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "logit_bias")
            out[token] = value
        return out

    def completion_prompts(self, body: "CompletionBody") -> tuple[Optional[list[str]], list[list[int]]]:
        """Each prompt's text (None when the prompts came as token ids) and token ids: the body
        holds a string, a list of strings, token ids, or lists of them."""
        prompt = body.prompt
        if not isinstance(prompt, str) and not prompt:
            raise ApiError(400, "prompt is an empty list", "prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
        if texts is None:
            batches = [prompt] if isinstance(prompt[0], int) else prompt
            if not all(batches):
                raise ApiError(400, "prompt: a token-id prompt is empty", "prompt")
            return None, [list(ids) for ids in batches]
        if self.tokenizer is None:
            raise ApiError(400, "this artifact has no tokenizer: send the prompt as a list of token ids", "prompt")
        return list(texts), [self.tokenizer.encode(text) for text in texts]

    def echoed(self, body: "CompletionBody", texts: Optional[list[str]],
               prompts: list[list[int]]) -> Optional[list[str]]:
        """With ``echo``, each prompt's text (what the choices start with); None without."""
        if not body.echo:
            return None
        if texts is not None:
            return texts
        if self.tokenizer is None:
            raise ApiError(400, "echo of token-id prompts needs the artifact's tokenizer", "echo")
        return [self.tokenizer.decode(ids) for ids in prompts]

    def chat_ids(self, messages: list, add_generation_prompt: bool = True,
                 tools: Optional[list[dict]] = None) -> list[int]:
        """The token ids of a conversation rendered by the model's chat template (with the
        ``tools`` when given; earlier calls' arguments as objects, as templates expect them)."""
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            message = {"role": m.role, "content": content or ""}
            if m.tool_calls:
                message["tool_calls"] = [_template_call(call) for call in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                message["name"] = m.name
            plain.append(message)
        extra = {"tools": tools} if tools else {}
        try:
            prompt = self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation
            raise ApiError(400, f"the chat template cannot format these messages: {exc}", "messages") from None
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def tools(self, body: "ChatBody") -> tuple[Optional[list[dict]], Optional[str], Optional[str]]:
        """(the tools the template renders, the format to find calls in the answer (None: do not
        look), the Lark grammar of the calls a tool_choice forces)."""
        if not body.tools:
            if body.tool_choice not in (None, "none", "auto"):
                raise ApiError(400, "tool_choice asks for a tool call, but the request has no tools", "tool_choice")
            return None, None, None
        try:
            tools = tools_.check_tools(body.tools)
        except tools_.ToolError as exc:
            raise ApiError(400, str(exc), "tools") from None
        try:
            mode, forced = tools_.chosen_tools(tools, body.tool_choice)
        except tools_.ToolError as exc:
            raise ApiError(400, str(exc), "tool_choice") from None
        if mode == "none":
            return tools, None, None
        if self.tool_format is None:
            raise ApiError(400, "this model's chat template renders no tools (or in a format llmc does not know), so "
                                "it cannot call them; start llmc serve with --tool-call-parser "
                                f"{{{','.join(tools_.FORMATS)}}} if its template does", "tools")
        one = body.parallel_tool_calls is False
        grammar = tools_.call_grammar(self.tool_format, forced, parallel=not one) if mode == "required" else None
        return tools, self.tool_format, grammar

    def check_tokenizer_request(self, model: Optional[str]) -> None:
        if model is not None:
            self.check_model_name(model)
        if self.tokenizer is None:
            raise ApiError(400, "this artifact has no tokenizer")

    def check_choices(self, prompts: int, n: int) -> None:
        """At most MAX_CHOICES a request (a 400), and room for them under ``max_concurrent``
        (a 429 with Retry-After: the queue stays bounded when more clients come than it serves)."""
        if prompts * n > MAX_CHOICES:
            raise ApiError(400, f"{prompts} prompt(s) x n={n} asks for {prompts * n} choices; at most {MAX_CHOICES} "
                                f"per request", "n")
        active = self.engine.active_requests
        if active + prompts * n > self.max_concurrent:
            self.metrics.rejected()
            raise ApiError(429, f"the server is at its limit of {self.max_concurrent} concurrent requests "
                                f"({active} running or waiting); retry shortly", None, "server_overloaded",
                           "server_overloaded")

    async def start(self, prompts: list[list[int]], n: int, params, rid: str) -> list:
        """Every choice started (see choices.py); a refused prompt is a 400."""
        try:
            return await choices_.start(self.engine.generate, prompts, n, params, rid)
        except choices_.PromptRefused as exc:
            raise ApiError(400, str(exc), "prompt") from None

    def check_model_name(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.model_name}' (GET /v1/models)", "model", "model_not_found")

    def check_model(self, body: _Common) -> None:
        """The model name, then fields this server does not implement (a 400 naming them)."""
        self.check_model_name(body.model)
        name = body.unsupported()
        if name:
            raise ApiError(400, f"{name} is not supported by this server (llmc); leave it out", name)

    def check_prompt(self, ids: list[int]) -> None:
        try:
            self.engine.engine.check_prompt(ids)
        except ValueError as exc:
            code = "context_length_exceeded" if "at most" in str(exc) else None
            raise ApiError(400, str(exc), "prompt", code) from None

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer else str(token)


def usage(lasts: dict, n: int) -> dict:
    """A request's usage from each choice's last output: every prompt counted once (by its
    first sample: the others reuse its cached blocks), every choice's generated tokens."""
    leaders = [out for c, out in lasts.items() if c.index % n == 0]
    prompt = sum(out.prompt_tokens for out in leaders)
    completion = sum(out.completion_tokens for out in lasts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(out.cached_tokens for out in leaders)}}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return error_response(503, str(exc), "service_unavailable")

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    @app.get("/health")
    async def health():
        if not server.engine.alive or not server.engine.accepting:
            return error_response(503, "the engine is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "llmc",
                                            "max_model_len": server.engine.engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        """vLLM's extra route: a prompt's (or a conversation's) token ids and count."""
        server.check_tokenizer_request(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        ids = (server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
               if body.prompt is not None else server.chat_ids(body.messages, body.add_generation_prompt))
        return {"count": len(ids), "max_model_len": server.engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        """vLLM's extra route: the text of token ids."""
        server.check_tokenizer_request(body.model)
        try:
            server.engine.engine.check_token_ids(body.tokens)
        except ValueError as exc:
            raise ApiError(400, str(exc), "tokens") from None
        return {"prompt": server.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        server.check_model(body)
        texts, prompts = server.completion_prompts(body)
        echoed = server.echoed(body, texts, prompts)
        server.check_choices(len(prompts), body.n)
        for ids in prompts:
            server.check_prompt(ids)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        scoring = body.scoring()
        if max_tokens == 0 and scoring is None and not body.echo:
            raise ApiError(400, "max_tokens=0 generates nothing; it scores the prompt only, with echo and logprobs "
                                "or prompt_logprobs", "max_tokens")
        if scoring is not None and body.stream:
            raise ApiError(400, "the prompt's logprobs (echo with logprobs, or prompt_logprobs) come with "
                                "stream=false", "stream")
        grammar = await server.grammar(body)
        params = [server.params(body, max_tokens, len(ids), body.logprobs, grammar, scoring) for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        started = await server.start(prompts, body.n, lambda p, s: params[p][s], rid)
        if body.stream:
            return StreamingResponse(_completion_stream(server, rid, started, body.n, include_usage, body.logprobs,
                                                        echoed), media_type="text/event-stream")
        scored = {c.prompt: c.first.prompt_logprobs for c in started if c.index % body.n == 0}
        results = await _collect(started, request)
        out = []
        for c, r in zip(started, results):
            choice = {"index": c.index, "text": (echoed[c.prompt] if echoed else "") + r.text,
                      "finish_reason": r.last.finish_reason, "logprobs": None}
            if body.logprobs is not None:
                head = scored[c.prompt] if echoed else None  # echo: the prompt's tokens come first
                choice["logprobs"] = _completion_logprobs(server, r.samples, 0, prompts[c.prompt] if head else None,
                                                          head, body.logprobs)
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(server, scored[c.prompt], body.prompt_logprobs)
            out.append(choice)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
                "choices": out, "usage": usage({c: r.last for c, r in zip(started, results)}, body.n)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        server.check_model(body)
        if server.tokenizer is None:
            raise ApiError(400, "this artifact has no tokenizer, so it cannot chat")
        server.check_choices(1, body.n)
        tools, tool_format, tool_grammar = server.tools(body)
        ids = server.chat_ids(body.messages, tools=tools)
        server.check_prompt(ids)
        top = body.top_logprobs if body.logprobs else None
        logprobs = (top or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.prompt_logprobs is not None and body.stream:
            raise ApiError(400, "prompt_logprobs come with stream=false", "stream")
        params = server.params(body, max_tokens, len(ids), logprobs, await server.grammar(body, tool_grammar),
                               body.prompt_logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        started = await server.start([ids], body.n, lambda p, s: params[s], rid)
        if body.stream:
            return StreamingResponse(_chat_stream(server, rid, started, body.n, include_usage, logprobs is not None,
                                                  tool_format, tools, body.parallel_tool_calls is False),
                                     media_type="text/event-stream")
        results = await _collect(started, request)
        out = []
        for c, r in zip(started, results):
            message, finish = {"role": "assistant", "content": r.text}, r.last.finish_reason
            content, calls = tools_.parse(tool_format, r.text, tools) if tool_format else (r.text, [])
            calls = calls[:1] if body.parallel_tool_calls is False else calls
            if calls:
                message, finish = {"role": "assistant", "content": content,
                                   "tool_calls": [call.as_openai(tool_format) for call in calls]}, "tool_calls"
            out.append({"index": c.index, "message": message, "finish_reason": finish,
                        "logprobs": {"content": _chat_logprobs(server, r.samples)} if logprobs is not None else None})
        reply = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": server.model_name,
                 "choices": out, "usage": usage({c: r.last for c, r in zip(started, results)}, body.n)}
        if body.prompt_logprobs is not None:  # vLLM puts the one prompt's beside the choices
            reply["prompt_logprobs"] = _vllm_prompt_logprobs(server, started[0].first.prompt_logprobs,
                                                             body.prompt_logprobs)
        return reply

    return app


def _template_call(call: dict) -> dict:
    """An earlier tool call as chat templates read it: the arguments as an object (OpenAI sends
    them as a JSON string; templates render them with ``tojson``)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, "messages: a tool call must be {'id', 'type': 'function', 'function': {'name', "
                            "'arguments'}}", "messages")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ApiError(400, f"messages: the arguments of the call to {fn['name']} are not JSON", "messages") from None
    return {**call, "function": {**fn, "arguments": args}}


async def _collect(started: list, request: Request) -> list:
    """Every choice's whole output; a client that disconnects meanwhile aborts them all."""
    results = await choices_.collect(started, request.is_disconnected)
    if results is None:
        raise ApiError(499, "the client closed the request")
    return results


def _completion_logprobs(server: Server, samples, offset: int, prompt: Optional[list[int]] = None,
                         scored: Optional[list] = None, k: int = 0) -> dict:
    """OpenAI's completion logprobs of ``samples``; with echo, the ``prompt`` tokens' first
    (``scored``: one Sample per position, None for the first token, which has no logprob)."""
    tokens, offsets, logprobs, tops = [], [], [], []
    for sample in scored if prompt else []:
        logprobs.append(sample.logprob if sample else None)
        tops.append({server.token_text(t): lp for t, lp in sample.top_logprobs[:k]} if sample else None)
    for s in samples:
        logprobs.append(s.logprob)
        tops.append({server.token_text(t): lp for t, lp in s.top_logprobs})
    for token in list(prompt or []) + [s.token for s in samples]:
        offsets.append(offset)
        text = server.token_text(token)
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _vllm_prompt_logprobs(server: Server, scored: list, k: int) -> list:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or {token id: {logprob,
    rank, decoded_token}} for the prompt's token and the k likeliest."""
    out = []
    for sample in scored:
        if sample is None:
            out.append(None)
            continue
        entry = {str(sample.token): {"logprob": sample.logprob, "rank": sample.rank,
                                     "decoded_token": server.token_text(sample.token)}}
        for rank, (token, lp) in enumerate(sample.top_logprobs[:k], start=1):
            entry.setdefault(str(token), {"logprob": lp, "rank": rank, "decoded_token": server.token_text(token)})
        out.append(entry)
    return out


def _chat_logprobs(server: Server, samples) -> list:
    def entry(token, lp):
        text = server.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
            for s in samples]


async def _completion_stream(server: Server, rid: str, started: list, n: int, include_usage: bool,
                             logprobs: Optional[int], echoed: Optional[list[str]] = None):
    created, lasts, offsets = int(time.time()), {}, {}
    head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
    outputs = choices_.merged(started)
    try:
        for c in started if echoed else ():  # echo: each choice starts with its prompt's text
            yield sse({**head, "choices": [{"index": c.index, "text": echoed[c.prompt], "finish_reason": None,
                                            "logprobs": None}]})
        async for c, out in outputs:
            lasts[c] = out
            if not out.text and not out.finished and logprobs is None:
                continue
            choice = {"index": c.index, "text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                      "logprobs": None}
            if logprobs is not None:
                choice["logprobs"] = _completion_logprobs(server, out.new_samples, offsets.get(c, 0))
            offsets[c] = offsets.get(c, 0) + len(out.text)
            yield sse({**head, "choices": [choice]})
        if include_usage and lasts:
            yield sse({**head, "choices": [], "usage": usage(lasts, n)})
        yield "data: [DONE]\n\n"
    finally:
        await choices_.close(started, outputs)  # a disconnected client aborts its requests (frees their blocks)


async def _chat_stream(server: Server, rid: str, started: list, n: int, include_usage: bool, logprobs: bool,
                       tool_format: Optional[str] = None, tools: Optional[list[dict]] = None,
                       single_call: bool = False):
    """With ``tool_format``, text that may begin a tool call is held back; the calls found go
    out in one ``tool_calls`` delta before the final chunk (finish_reason "tool_calls")."""
    created, lasts = int(time.time()), {}
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}
    outputs = choices_.merged(started)
    answers = {c: tools_.StreamedAnswer(tool_format, tools) for c in started} if tool_format else {}
    try:
        for c in started:
            yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for c, out in outputs:
            lasts[c] = out
            text, finish = out.text, out.finish_reason if out.finished else None
            if answers:
                text = answers[c].push(out.text)
                if out.finished:
                    rest, calls = answers[c].finish()
                    text += rest
                    if calls:
                        if text:
                            yield sse({**head, "choices": [{"index": c.index, "delta": {"content": text},
                                                            "logprobs": None, "finish_reason": None}]})
                            text = ""
                        calls = calls[:1] if single_call else calls
                        deltas = [{"index": i, **call.as_openai(tool_format)} for i, call in enumerate(calls)]
                        yield sse({**head, "choices": [{"index": c.index, "delta": {"tool_calls": deltas},
                                                        "logprobs": None, "finish_reason": None}]})
                        finish = "tool_calls"
            if not text and not out.finished and not logprobs:
                continue
            delta = {"content": text} if text or not out.finished else {}
            choice = {"index": c.index, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": _chat_logprobs(server, out.new_samples)} if logprobs else None}
            yield sse({**head, "choices": [choice]})
        if include_usage and lasts:
            yield sse({**head, "choices": [], "usage": usage(lasts, n)})
        yield "data: [DONE]\n\n"
    finally:
        await choices_.close(started, outputs)


# --- middleware: API key and body size -------------------------------------------------------
class Guard:
    """Pure ASGI middleware (so streaming and disconnects pass through untouched): every /v1
    route needs the API key when one is set; request bodies over the limit get a 413."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def _send_error(self, send, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self.server.api_key
        if key and scope["path"].startswith(PROTECTED):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                what = "missing" if not given else "incorrect"
                return await self._send_error(send, 401, f"{what} API key: send 'Authorization: Bearer <key>' "
                                                         f"with the key the server was started with", "invalid_api_key")
        limit = self.server.max_body_bytes
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await self._send_error(send, 413, f"the request body is {int(length)} bytes; the limit is "
                                                         f"{limit}", "request_too_large")
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # disconnected before the body arrived
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await self._send_error(send, 413, f"the request body is over the limit of {limit} bytes",
                                                  "request_too_large")
                if not message.get("more_body"):
                    break
            body, sent = b"".join(chunks), False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def build_asgi(server: Server):
    return Guard(create_app(server), server)


__all__ = ["ApiError", "Server", "build_asgi", "create_app"]


DEFAULT_HTTP_NICE = 19


def lower_this_thread(nice: int) -> bool:
    """Give the calling thread (only) the scheduling niceness ``nice`` if that lowers its
    priority; True when done. Linux keeps a niceness per thread; elsewhere setpriority would
    take the whole process (the kernels' threads too), so nothing happens there.

    Why: the event loop's work per streamed token (HTTP framing, JSON, socket writes) competes
    for the cores with the kernels' threads, which wait for each other at every parallel loop,
    so each time the loop preempts one of them the whole step waits. At a low priority the loop
    runs when a kernel thread yields (between kernels) instead of preempting one mid-kernel."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) >= nice:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        return False
    return True


def run_server(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_seconds: float = 30.0,
               log_level: str = "info", http_nice: int = DEFAULT_HTTP_NICE,
               max_concurrent: int = DEFAULT_MAX_CONCURRENT, tool_call_parser: str = "auto") -> None:
    """Serve ``engine`` until SIGTERM/SIGINT. On the signal uvicorn stops accepting, lets the
    requests in flight finish for at most ``drain_seconds``, then the engine thread stops.
    The event loop runs on this thread at niceness ``http_nice`` (Linux; see
    ``lower_this_thread``), lowered after the engine thread (and the kernel threads it starts)
    began at this thread's priority; 0 leaves it alone."""
    import uvicorn

    async_engine = AsyncEngine(engine).start()
    lower_this_thread(http_nice)
    server = Server(async_engine, model_name, api_key, max_body_bytes, max_concurrent=max_concurrent,
                    tool_call_parser=tool_call_parser)
    config = uvicorn.Config(build_asgi(server), host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=drain_seconds, access_log=log_level == "debug")
    uv = uvicorn.Server(config)
    try:
        uv.run()
    finally:
        async_engine.shutdown()
