"""Choosing the next token from logits, with numpy only.

The runtime serves without torch, so sampling is a few numpy operations on one logits row.
Order (as in transformers and llama.cpp): repetition penalty, then greedy argmax if
temperature is 0, else temperature, top-k, top-p, min-p and a draw from a
``numpy.random.Generator`` seeded from ``seed``, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens; invalid values raise ValueError naming the field and its range."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: int = 128
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self):
        def bad(field: str, allowed: str):
            value = getattr(self, field)
            raise ValueError(f"invalid sampling parameter {field}={value!r}: must be {allowed}")

        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 means off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1] (1 means off)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1] (0 means off)")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            bad("repetition_penalty", "a number > 0 (1 means off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad("seed", "None or an integer >= 0")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        try:
            ids = tuple(self.stop_token_ids)
        except TypeError:
            ids = None
        if ids is None or not all(_is_int(i) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of integer token ids >= 0")
        self.stop_token_ids = tuple(int(i) for i in ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Samples one sequence's tokens; holds that sequence's random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, previous_ids: Sequence[int] = ()) -> int:
        """The next token id for a logits row of shape [vocab]."""
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be one row of shape [vocab], got shape {logits.shape}")
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and len(previous_ids):
            seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.size)]
            values = logits[seen]
            # As in transformers (CTRL paper): shrink positive logits, push negative ones further down.
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.greedy or p.top_k == 1:
            return int(np.argmax(logits))

        logits /= p.temperature
        # Candidates sorted by logit, highest first (stable: ties keep the lower id first, as argmax).
        if 0 < p.top_k < logits.size:
            candidates = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
        else:
            candidates = np.arange(logits.size)
        candidates = candidates[np.lexsort((candidates, -logits[candidates]))]
        scores = logits[candidates]
        if not np.isfinite(scores[0]):
            raise ValueError(f"cannot sample: the highest logit is {scores[0]}; the model produced "
                             f"inf/nan logits (check the artifact's numerics)")
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        keep = probs.size
        if p.top_p < 1.0:
            # The smallest prefix whose mass reaches top_p (always at least one token).
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        probs = probs[:keep]
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, keep - 1)])
