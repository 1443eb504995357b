"""Choosing the next token from logits, with numpy only, per request inside a batch.

The runtime serves without torch, so sampling is a few numpy operations per logits row. Each
request has its own ``Sampler`` holding its parameters and its own random generator (seeded
from ``seed``), and draws exactly one uniform number per sampled token, so a seeded request
gives the same tokens whatever else shares its batch. Order (as in transformers, vLLM and
llama.cpp): penalties (repetition over prompt and output, presence/frequency over the output)
and logit biases (OpenAI's ``logit_bias``: a number added to given tokens' logits), then
greedy argmax if temperature is 0, else temperature, top-k, min-p, top-p and the draw.
Log-probabilities are those of the penalized logits before temperature (the model's view).
No full-vocabulary sort per token: top-k and top-logprobs use argpartition, top-p sorts only
the smallest top slice whose mass reaches p (growing it 4x at a time when needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; invalid values raise ValueError naming the field."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 128
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()          # stop strings: the text ends before the first one
    ignore_eos: bool = False
    logprobs: Optional[int] = None    # None: none; k: the chosen token's logprob and the top k
    skip_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit (in [-100, 100])
    grammar: Optional[str] = None     # llguidance grammar the output must follow (runtime/structured.py)
    prompt_logprobs: Optional[int] = None  # k: each prompt token's logprob, rank and the top k (model's view)

    def __post_init__(self):
        def bad(name: str, allowed: str):
            value = getattr(self, name)
            raise ValueError(f"invalid sampling parameter {name}={value!r}: must be {allowed}")

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                bad(name, "a number in [-2, 2] (0 means off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad("seed", "None or an integer >= 0")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "an integer >= 0 (0: score the prompt, generate nothing)")
        try:
            ids = tuple(self.stop_token_ids)
        except TypeError:
            ids = None
        if ids is None or not all(_is_int(i) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of integer token ids >= 0")
        self.stop_token_ids = tuple(int(i) for i in ids)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            bad("stop", "a string or a list of non-empty strings")
        self.stop = tuple(stop)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(k) and k >= 0 and _is_number(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS
                    for k, v in self.logit_bias.items()):
                bad("logit_bias",
                    f"a mapping of token ids >= 0 to numbers in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()} or None
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            bad("prompt_logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            bad("grammar", "None or a grammar string (runtime.structured.grammar_from)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the logits change before sampling (penalties or biases): such rows take the
        per-request path of ``sample_batch``."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


@dataclass
class Sample:
    """One chosen token, with its log-probability and the top alternatives when asked for."""

    token: int
    logprob: Optional[float] = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    rank: Optional[int] = None  # 1 + how many tokens were likelier (prompt logprobs)


def log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def scored_tokens(rows: np.ndarray, tokens: Sequence[int], k: int) -> list[Sample]:
    """Given tokens scored under logits ``rows`` [m, vocab] (prompt logprobs: row j is the
    model's prediction before token j): each one's logprob, rank and the top ``k``, from the raw
    logits (no penalties, no temperature)."""
    rows = np.asarray(rows, dtype=np.float32)
    peak = rows.max(axis=1)
    lse = np.log(np.exp(rows - peak[:, None]).sum(axis=1)) + peak
    picked = rows[np.arange(len(tokens)), np.asarray(tokens, dtype=np.int64)]
    ranks = (rows > picked[:, None]).sum(axis=1) + 1
    out = []
    for j, token in enumerate(tokens):
        top = [(int(i), float(rows[j, i] - lse[j])) for i in top_indices(rows[j], k)] if k else []
        out.append(Sample(int(token), float(picked[j] - lse[j]), top, int(ranks[j])))
    return out


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (ties: lower index first), no full sort."""
    k = min(k, values.size)
    if k < values.size:
        part = np.argpartition(-values, k - 1)[:k]
    else:
        part = np.arange(values.size)
    return part[np.lexsort((part, -values[part]))]


CDF_BLOCK = 1024


def inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index i where the running sum of ``weights`` first exceeds ``u`` times their total
    (weights >= 0, at least one > 0). Over a whole vocabulary a plain ``np.cumsum`` costs
    ~0.6 ms a row (numpy's scan is scalar); block sums (vectorized), a scan over those and one
    over the chosen block give the same index in a tenth of that."""
    n = weights.size
    if n <= 4 * CDF_BLOCK:
        cumulative = np.cumsum(weights, dtype=np.float64)
        index = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), n - 1)
    else:
        full = n - n % CDF_BLOCK
        sums = weights[:full].reshape(-1, CDF_BLOCK).sum(axis=1, dtype=np.float64)
        if full < n:
            sums = np.append(sums, weights[full:].sum(dtype=np.float64))
        cumulative = np.cumsum(sums)
        target = u * cumulative[-1]
        block = min(int(np.searchsorted(cumulative, target, side="right")), sums.size - 1)
        while sums[block] <= 0.0:  # rounding put the target past the last weighted block
            block -= 1
        before = float(cumulative[block - 1]) if block else 0.0
        part = weights[block * CDF_BLOCK:(block + 1) * CDF_BLOCK]
        inner = np.cumsum(part, dtype=np.float64)
        index = block * CDF_BLOCK + min(int(np.searchsorted(inner, target - before, side="right")), part.size - 1)
    while weights[index] <= 0.0:  # never a token of zero weight (rounding at a block's end)
        index -= 1
    return index


class Sampler:
    """Samples one request's tokens; holds that request's parameters and random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, previous_ids: Sequence[int], output_ids: Optional[Sequence[int]]) -> np.ndarray:
        """Penalized float64 copy of ``logits``: repetition over ``previous_ids`` (prompt and
        output, CTRL/transformers style), presence and frequency over ``output_ids`` (OpenAI),
        then the logit biases (ids past the vocabulary are ignored; the server refuses them)."""
        p = self.params
        logits = logits.astype(np.float64, copy=True)
        vocab = logits.size
        if p.repetition_penalty != 1.0 and len(previous_ids):
            seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < vocab)]
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        out = previous_ids if output_ids is None else output_ids
        if (p.presence_penalty or p.frequency_penalty) and len(out):
            ids, counts = np.unique(np.asarray(out, dtype=np.int64), return_counts=True)
            keep = (ids >= 0) & (ids < vocab)
            ids, counts = ids[keep], counts[keep]
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    logits[token] += bias
        return logits

    def sample(self, logits: np.ndarray, previous_ids: Sequence[int] = (), output_ids: Optional[Sequence[int]] = None) -> int:
        """The next token id for a logits row of shape [vocab]."""
        return self.sample_full(logits, previous_ids, output_ids).token

    def sample_full(self, logits: np.ndarray, previous_ids: Sequence[int] = (),
                    output_ids: Optional[Sequence[int]] = None) -> Sample:
        """The next token with its logprobs (when ``params.logprobs`` is set)."""
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be one row of shape [vocab], got shape {logits.shape}")
        logits = self.penalize(logits, previous_ids, output_ids)
        token = int(np.argmax(logits)) if p.greedy else self._draw(logits)
        out = Sample(token)
        if p.logprobs is not None:
            lp = log_softmax(logits)
            out.logprob = float(lp[token])
            if p.logprobs:  # (a grammar's excluded tokens, at -inf, are no alternatives)
                out.top_logprobs = [(int(i), float(lp[i])) for i in top_indices(lp, p.logprobs) if lp[i] > -np.inf]
        return out

    def _draw(self, logits: np.ndarray) -> int:
        return draw_rows([self], np.asarray(logits, dtype=np.float32)[None, :])[0]

    def _pick(self, candidates: Optional[np.ndarray], probs: np.ndarray) -> int:
        """min-p, top-p and the draw over unnormalized ``probs`` (of ``candidates``, or of
        the whole vocabulary when None)."""
        p = self.params
        if p.min_p > 0.0:  # relative to the most likely token, whose weight here is exp(0) = 1
            probs = np.where(probs >= p.min_p, probs, 0.0)
        if p.top_p < 1.0:
            candidates, probs = self._nucleus(candidates, probs)
        u = self.rng.random()  # exactly one draw per sampled token: reproducible under any batching
        index = inverse_cdf(probs, u)
        return index if candidates is None else int(candidates[index])

    def _nucleus(self, candidates: Optional[np.ndarray], probs: np.ndarray):
        """The smallest highest-probability prefix whose mass reaches top_p (at least one token),
        found by sorting only a top slice that grows until it holds that mass."""
        total = probs.sum()
        k = min(64, probs.size)
        while True:
            order = top_indices(probs, k)
            cumulative = np.cumsum(probs[order])
            if cumulative[-1] >= self.params.top_p * total or k == probs.size:
                keep = int(np.searchsorted(cumulative, self.params.top_p * total)) + 1
                order = order[:min(keep, k)]
                break
            k = min(probs.size, k * 4)
        chosen = order if candidates is None else candidates[order]
        return chosen, probs[order]


def draw_rows(samplers: Sequence[Sampler], rows: np.ndarray) -> list[int]:
    """One drawn token per row of float32 (penalized) logits ``rows`` [b, vocab] for samplers
    with a temperature: the scaling, row maxima and (without top-k) the exponentials run over
    the whole batch at once in float32; top-k, min-p, top-p and each request's own draw per
    row. One row or many, a row gets the same token (elementwise operations throughout)."""
    vocab = rows.shape[1]
    temps = np.array([s.params.temperature for s in samplers], dtype=np.float32)
    scaled = rows / temps[:, None]
    tops = scaled.max(axis=1)
    if not np.all(np.isfinite(tops)):
        top = float(tops[~np.isfinite(tops)][0])
        raise ValueError(f"cannot sample: the highest logit is {top}; the model produced "
                         f"inf/nan logits (check the artifact's numerics)")
    full = [i for i, s in enumerate(samplers) if not 0 < s.params.top_k < vocab]
    probs_of = {}
    if full:
        sub = scaled if len(full) == len(samplers) else scaled[full]
        exp = np.exp(sub - tops[full, None])
        probs_of = {i: exp[j] for j, i in enumerate(full)}
    out = []
    for i, s in enumerate(samplers):
        if i in probs_of:
            out.append(s._pick(None, probs_of[i]))
        else:
            candidates = top_indices(scaled[i], s.params.top_k)
            out.append(s._pick(candidates, np.exp(scaled[i][candidates] - tops[i])))
    return out


def sample_batch(samplers: Sequence[Sampler], logits: np.ndarray, previous: Sequence[Sequence[int]],
                 outputs: Sequence[Sequence[int]]) -> list[Sample]:
    """One token per row of ``logits`` [B, vocab]. Greedy rows without penalties or logprobs
    take one vectorized argmax; rows with a temperature and without logprobs are drawn
    together (``draw_rows``); the others go through their own sampler."""
    results: list[Optional[Sample]] = [None] * len(samplers)
    plain = [b for b, s in enumerate(samplers)
             if s.params.greedy and not s.params.penalized and s.params.logprobs is None]
    if plain:
        rows = logits if len(plain) == len(logits) else logits[plain]  # no copy when every row is plain
        for b, token in zip(plain, np.argmax(rows, axis=1).tolist()):
            results[b] = Sample(int(token))
    drawn = [b for b, s in enumerate(samplers) if not s.params.greedy and s.params.logprobs is None]
    if drawn:
        rows = np.asarray(logits[drawn], dtype=np.float32)
        for j, b in enumerate(drawn):
            if samplers[b].params.penalized:
                rows[j] = samplers[b].penalize(logits[b], previous[b], outputs[b])
        for b, token in zip(drawn, draw_rows([samplers[b] for b in drawn], rows)):
            results[b] = Sample(token)
    for b, s in enumerate(samplers):
        if results[b] is None:
            results[b] = s.sample_full(logits[b], previous[b], outputs[b])
    return results  # type: ignore[return-value]


__all__ = ["MAX_LOGIT_BIAS", "MAX_LOGPROBS", "Sample", "Sampler", "SamplingParams", "draw_rows", "inverse_cdf",
           "log_softmax", "sample_batch", "scored_tokens", "top_indices"]
