"""Perplexity of a token sequence with a sliding window, through the compiled step.

Why a separate path from ``Engine.step``: perplexity needs the logits of every position, and
the step returns one row per sequence. ``all_logits`` gets them from one prefill by giving
each row its own one-token "sequence" that shares the same KV blocks: row i is sequence i,
of length i + 1, whose blocks the step writes (slot = position) before its attention reads
them. That is an ordinary step batch (query_start / seq_lens / logits_index per row), so
the compiled kernels run unchanged.

The windowing is the usual strided evaluation: windows of ``window`` tokens every
``stride`` tokens, each token scored once, by the window where it has the most context
(as in the Hugging Face perplexity guide). It takes any ``logits_fn`` so a reference model
can be measured on exactly the same windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .step import StepBatch

LogitsFn = Callable[[np.ndarray], np.ndarray]  # ids [L] -> logits [L, vocab] (row i predicts ids[i + 1])


def all_logits(executor, ids: np.ndarray) -> np.ndarray:
    """Logits [L, vocab] of every position of ``ids`` from one step of ``executor``."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.size
    bs = executor.block_size
    blocks = -(-n // bs)
    if blocks > executor.num_blocks or n > executor.max_model_len:
        raise ValueError(f"a window of {n} tokens does not fit this artifact's KV pool "
                         f"({executor.num_blocks} blocks of {bs}); use a smaller --window")
    pos = np.arange(n, dtype=np.int64)
    table = np.broadcast_to(np.arange(blocks, dtype=np.int64), (n, blocks)).copy()
    batch = StepBatch(ids, pos, pos.copy(), table, pos + 1, np.arange(n + 1, dtype=np.int64), pos.copy())
    return executor.step(batch)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[:, 0]
    return x[np.arange(len(targets)), targets] - lse


def perplexity(ids: Sequence[int], logits_fn: LogitsFn, window: int = 512, stride: int = 256) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (token 0 is context only, never scored)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size < 2:
        raise ValueError("perplexity needs at least two tokens")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    total, count, windows, scored_to = 0.0, 0, 0, 1  # next token index not scored yet
    begin = 0
    while scored_to < ids.size:
        begin = min(begin, scored_to - 1)  # a window's first row has no context: start one earlier
        end = min(begin + window, ids.size)
        logits = np.asarray(logits_fn(ids[begin:end]))
        first = max(scored_to, begin + 1)
        rows = np.arange(first - 1 - begin, end - 1 - begin)
        total -= float(_log_softmax_at(logits[rows], ids[first:end]).sum())
        count += end - first
        scored_to, windows = end, windows + 1
        begin += stride
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, windows)
