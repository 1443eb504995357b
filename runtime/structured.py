"""Structured output: sampling held to a grammar (a JSON schema, any JSON object, a regular
expression, a choice of strings, a Lark grammar), so the text a request returns parses.

Why llguidance: for the whole vocabulary it computes which tokens keep the output inside the
grammar in microseconds a step (~7 us for 49k tokens inside a JSON object: a token trie walked
against an Earley parser), it needs no torch, and it reads the artifact's tokenizer.json as it is. The engine only masks each constrained
row of logits with that set before sampling (the other tokens get -inf) and feeds every sampled
token back; a grammar that is complete ends its request (finish reason "stop"). Whitespace
inside JSON is fixed (``", "`` and ``": "``, no newlines): a model that may put any whitespace
between JSON tokens can loop on newlines forever, the known failure of JSON modes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger("llmc.structured")

TEMPLATES = 64  # compiled grammars kept per engine (a client repeating its schema compiles it once)
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# json.dumps' separators, the spacing models mostly write; a schema's "x-guidance" overrides these
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A constraint that cannot be used: the message names what is wrong with it."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs the llguidance package: pip install 'llmc[serve]' "
                           "(or pip install llguidance)") from None
    return llguidance


def grammar_from(kind: str, spec: Any) -> str:
    """llguidance's grammar for one constraint: ``json_schema`` (a schema object or its JSON
    text), ``json_object`` (any JSON object; ``spec`` ignored), ``regex`` (the whole output
    matches it), ``choice`` (exactly one of the given strings) or ``grammar`` (Lark syntax)."""
    matcher = _llguidance().LLMatcher
    if kind == "json_object":
        kind, spec = "json_schema", {"type": "object"}
    if kind == "json_schema":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(spec, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object, got {type(spec).__name__}")
        try:
            return matcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
    if kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise GrammarError("a regex constraint must be a non-empty string")
        return matcher.grammar_from_regex(spec)
    if kind == "choice":
        if (not isinstance(spec, (list, tuple)) or not spec
                or not all(isinstance(s, str) and s for s in spec)):
            raise GrammarError("a choice constraint must be a non-empty list of non-empty strings")
        # Lark string literals take JSON's escapes, so any string is one literal
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(s, ensure_ascii=False) for s in spec))
    if kind == "grammar":
        if not isinstance(spec, str) or not spec.strip():
            raise GrammarError("a grammar constraint must be a non-empty Lark grammar")
        return matcher.grammar_from_lark(spec)
    raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")


class Grammars:
    """One engine's side of llguidance: its token table (built on first use, ~0.3 s for a
    49k-token vocabulary, from a thread other than the engine's when the server checks a
    request's grammar first) and a matcher per constrained request."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Iterable[int]):
        self._json = tokenizer_json  # called once, when the first grammar needs the token table
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = sorted(int(i) for i in eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()
        self._templates: "OrderedDict[str, Any]" = OrderedDict()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                lib = _llguidance()
                try:
                    self._tokenizer = lib.LLTokenizer(self._json(), n_vocab=self.vocab_size,
                                                      eos_token=self.eos_token_ids or None)
                except Exception as exc:  # noqa: BLE001 - llguidance raises its own types
                    raise GrammarError(f"structured output cannot use this artifact's tokenizer: {exc}") from None
            return self._tokenizer

    def check(self, grammar: str) -> None:
        """Raise GrammarError naming the problem when ``grammar`` cannot constrain this model.
        The server calls it off the engine's thread; the compiled grammar is kept, so the
        engine's ``matcher`` copies it (~0.01-0.05 ms) instead of compiling (1-6 ms, a stall
        of every running request)."""
        self._template(grammar)

    def matcher(self, grammar: str) -> "GrammarMatcher":
        return GrammarMatcher(self._template(grammar).deep_copy(), self.vocab_size, self.eos_token_ids)

    def _template(self, grammar: str):
        """The compiled, never advanced matcher of ``grammar`` (the last TEMPLATES kept)."""
        if not isinstance(grammar, str):
            raise GrammarError("a grammar must be a string")
        with self._lock:
            template = self._templates.get(grammar)
            if template is not None:
                self._templates.move_to_end(grammar)
                return template
        lib = _llguidance()
        message = lib.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if message and not message.startswith("WARNING"):
            raise GrammarError(f"invalid constraint: {message}")
        template = lib.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"invalid constraint: {template.get_error()}")
        template.compute_bitmask()  # the first mask builds lazy tables (~1.4 ms): here, not in the engine
        with self._lock:
            self._templates[grammar] = template
            while len(self._templates) > TEMPLATES:
                self._templates.popitem(last=False)
        return template


# _BYTE_MASKS[b]: the additive mask of the 8 tokens whose bits are byte b (0 allowed, -inf not)
_BYTE_MASKS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                       np.float32(0), np.float32(-np.inf)).astype(np.float32)


class GrammarMatcher:
    """Where one request stands in its grammar: which tokens may come next, and whether the
    grammar is complete."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: list[int]):
        self._matcher = matcher
        self._vocab = vocab_size
        self._eos = eos_token_ids
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def mask(self, logits_row: np.ndarray) -> None:
        """Add -inf to the logits of every token the grammar does not allow next, in place. When
        it allows none (the matcher hit an error: logged), the end-of-sequence tokens stay, so
        the request ends."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if not self._words.any():
            log.warning("grammar allows no token (%s); ending the request", self._matcher.get_error() or "no error")
            for token in self._eos:
                self._words[token // 32] |= np.int32(1 << (token % 32)) if token % 32 < 31 else np.int32(-(1 << 31))
        # one gather of 8 floats a mask byte (~20 us for 49k tokens; a boolean index costs ~80)
        logits_row += np.take(_BYTE_MASKS, self._words.view(np.uint8), axis=0).reshape(-1)[:self._vocab]

    def accept(self, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (nothing may follow)."""
        self._matcher.consume_token(int(token))
        return bool(self._matcher.is_stopped())


__all__ = ["GrammarError", "GrammarMatcher", "Grammars", "KINDS", "grammar_from"]
