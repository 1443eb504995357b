"""Prompt-lookup drafts for speculative decoding.

Why: one sequence's decode step is bound by reading the weights, so checking a few more
positions in the same step costs little (the linears read each weight once for all rows).
Text often repeats what came before it (a summary quotes its source, code repeats names, a
model repeats itself), so the tokens that followed the last occurrence of the current tail
are a free guess at what comes next. The engine runs the guess as extra positions of the
step and keeps the longest prefix that greedy decoding would have produced anyway, plus the
token the first mismatch gives: the output is the greedy output, in fewer steps.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NGRAM_MAX = 3  # the longest tail looked up (longer tails: fewer, surer matches)
NGRAM_MIN = 2  # one token matches too often to be worth a guess
MAX_WAIT = 8   # steps a request waits at most before guessing again


def propose(tokens: Sequence[int], k: int, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens of
    ``tokens`` (n from ``ngram_max`` down to ``ngram_min``); [] when the tail never occurred."""
    if k <= 0 or len(tokens) <= ngram_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    end = arr.size
    for n in range(min(ngram_max, end - 1), ngram_min - 1, -1):
        tail = arr[end - n:]
        # candidate starts i < end - n whose n tokens equal the tail, latest first
        starts = np.flatnonzero(arr[:end - n] == tail[0])
        for i in starts[::-1]:
            if i + n < end and np.array_equal(arr[i:i + n], tail):
                follow = arr[i + n:min(i + n + k, end)]
                if follow.size:
                    return follow.tolist()
    return []


def next_guess(k_max: int, guessed: int, held: int, misses: int) -> tuple[int, int, int]:
    """After ``held`` of ``guessed`` tokens held: (the next guess's length, failed guesses in a
    row, steps to wait before it). A step checking k guesses costs more the larger k (SmolLM2:
    2 rows 1.3x a decode step, 5 rows 1.8x), so the next guess is one longer than what held
    (all held: one longer than this one), and after a guess that failed outright the request
    waits 1, 3, 7, then 8 steps: text that does not repeat stops paying for guesses."""
    length = min(k_max, held + 1)
    misses = 0 if held else misses + 1
    return max(length, 1), misses, min((1 << misses) - 1, MAX_WAIT)


__all__ = ["MAX_WAIT", "NGRAM_MAX", "NGRAM_MIN", "next_guess", "propose"]
