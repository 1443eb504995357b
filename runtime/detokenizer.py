"""A request's output text as it grows, with stop strings applied.

Text pieces come from ``StreamDecoder`` (which never splits a UTF-8 character). A stop string
ends the text just before it; while the end of the text could still be the start of a stop
string, that tail is held back, so a streamed response never shows text the final one lacks.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .tokenizer import StreamDecoder, Tokenizer


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped: Optional[str] = None  # the stop string found, if any

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final (possibly '')."""
        if self.stopped is not None:
            return ""
        self.text += self.decoder.push(token_id)
        if self.stop:
            start = max(0, self.emitted - self.longest + 1)
            found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if found:
                index, self.stopped = min(found)
                self.text = self.text[:index]
                return self._emit(len(self.text))
            return self._emit(len(self.text) - self._held())
        return self._emit(len(self.text))

    def finish(self) -> str:
        """The text still held back when the request ends for another reason."""
        if self.stopped is None:
            self.text += self.decoder.flush()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece


__all__ = ["IncrementalText"]
