"""The artifact's tokenizer and chat template, without transformers.

An artifact ships ``tokenizer.json`` (HF tokenizers format) and its chat template in the
manifest; serving needs only the ``tokenizers`` library and jinja2. The template is rendered
the way transformers renders it (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, a ``tojson`` that does not HTML-escape), so prompts match token for token.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Iterable, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


def _raise_exception(message):
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson HTML-escapes '<', '>', '&', '\''; HF templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    # Some templates (Llama 3) print today's date.
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in the sandbox transformers uses (templates are untrusted code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Encode, decode and chat-format for one model, from its ``tokenizer.json``."""

    def __init__(self, path: str, chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, eos_token_ids: Iterable[int] = ()):
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"cannot read tokenizer file {path} ({exc}); it must be a Hugging Face "
                             f"tokenizers JSON file (tokenizer.json); recompile the artifact") from None
        self.path = path
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}
        if eos_token and self._tok.token_to_id(eos_token) is not None:
            self.eos_token_ids.add(self._tok.token_to_id(eos_token))
        self._template: Optional[jinja2.Template] = None

    def to_json(self) -> str:
        """The tokenizer as tokenizers JSON (what llguidance reads for structured output)."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string for a conversation, as transformers' ``apply_chat_template(tokenize=False)``."""
        if not self.chat_template:
            raise ValueError("this model has no chat template, so chat messages cannot be formatted; "
                             "send a plain text prompt instead, or compile a model whose tokenizer has a "
                             "chat template (an instruct/chat model)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


class StreamDecoder:
    """Turns generated token ids into text pieces as they arrive.

    Byte-level BPE splits a multi-byte UTF-8 character across tokens, and decoding one token
    alone gives U+FFFD. So the tail since the last emitted text is decoded whole, and a piece is
    emitted only once that tail no longer ends in an incomplete character. Decoding the tail
    together with the previous text (not the new ids alone) keeps spaces that decoders add or
    strip at a sequence's start right.
    """

    # A genuine U+FFFD in the output would otherwise hold text back forever; a UTF-8 character
    # is at most 4 bytes, so this many pending tokens means it is not an incomplete character.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the ids decoded for context
        self._read = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        pending = len(self.ids) - self._read
        if text.endswith(REPLACEMENT_CHAR) and pending < self.MAX_PENDING:
            return ""
        piece = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def flush(self) -> str:
        """The text still held back at the end of generation (possibly with U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]
