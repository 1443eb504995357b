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


__all__ = ["NGRAM_MAX", "NGRAM_MIN", "propose"]
