"""Sliding-window perplexity: every token after the first scored once, with the most context."""

import math

import numpy as np
import pytest

from llmc.runtime.perplexity import perplexity

V = 7


def test_uniform_model_has_perplexity_vocab():
    res = perplexity(list(range(5)) * 9, lambda ids: np.zeros((len(ids), V)), window=8, stride=3)
    assert res.tokens == 44 and math.isclose(res.perplexity, V, rel_tol=1e-12)


@pytest.mark.parametrize("window,stride", [(50, 50), (8, 8), (8, 3), (5, 1), (2, 1)])
def test_each_token_scored_once_with_its_window_context(window, stride):
    """A model that knows the context length each row saw: the sum of scores tells which
    windows scored which token, compared with an explicit computation."""
    ids = np.arange(40) % V
    seen = []

    def logits_fn(w):
        seen.append(len(w))
        out = np.zeros((len(w), V))
        out[np.arange(len(w)), w] = np.arange(len(w)) + 1.0  # row i is confident in ids[i] by i+1
        return out

    res = perplexity(ids, logits_fn, window=window, stride=stride)
    assert res.tokens == 39 and all(n <= window for n in seen)
    # expected: token j scored in the first window covering it whose start is past the last end
    total, scored_to, begin = 0.0, 1, 0
    while scored_to < 40:
        begin = min(begin, scored_to - 1)
        end = min(begin + window, 40)
        for j in range(max(scored_to, begin + 1), end):
            row = np.zeros(V)
            row[ids[j - 1]] = j - begin  # row j-1-begin -> value (j-1-begin)+1
            total -= row[ids[j]] - np.log(np.exp(row).sum())
        scored_to, begin = end, begin + stride
    assert math.isclose(res.nll, total / 39, rel_tol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        perplexity([1, 2, 3], lambda w: np.zeros((len(w), V)), window=4, stride=5)
    with pytest.raises(ValueError, match="two tokens"):
        perplexity([1], lambda w: np.zeros((len(w), V)))
