"""``llmc verify``: does a compiled artifact compute what transformers computes?

For each prompt the HF model generates greedily (fp32, its own KV cache); the artifact is
fed the same tokens (prompt, then HF's continuation one token at a time), so every step's
logits are compared on the same history. Reported per prompt: the max absolute logit error,
top-1 agreement (the fraction of steps whose argmax equals HF's token) and the identical
greedy continuation length (steps before the first disagreement; up to it, free-running
greedy decoding of both produces the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@dataclass
class PromptReport:
    prompt: str
    prompt_tokens: int
    max_logit_error: float
    top1_agreement: float
    identical_tokens: int
    steps: int
    logit_scale: float  # the largest |logit| transformers produced: errors are judged relative to it


def _prompt_ids(prompts: list[str], tokenizer, vocab: int) -> list[tuple[str, list[int]]]:
    """Token ids of each prompt: through the artifact's tokenizer, or (no tokenizer) each line
    read as space-separated ids; with neither, three fixed pseudo-random prompts."""
    out = []
    if tokenizer is not None:
        for p in prompts:
            ids = tokenizer.encode(p)
            if not ids:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
            out.append((p, ids))
        return out
    if prompts is DEFAULT_PROMPTS:
        g = torch.Generator().manual_seed(0)
        return [(f"random ids #{i}", torch.randint(3, vocab, (n,), generator=g).tolist())
                for i, n in enumerate((5, 17, 33))]
    for p in prompts:
        try:
            ids = [int(t) for t in p.split()]
        except ValueError:
            raise ValueError(f"the artifact has no tokenizer, so prompts must be space-separated token ids; "
                             f"got {p!r}") from None
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {p!r}: token ids must be in [0, {vocab})")
        out.append((p, ids))
    return out


def verify_artifact(engine, model, prompts: list[str] = DEFAULT_PROMPTS, new_tokens: int = 16) -> list[PromptReport]:
    vocab = int(model.config.get_text_config().vocab_size)
    reports = []
    for text, ids in _prompt_ids(prompts, engine.tokenizer, vocab):
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            want = [out.logits[0, -1].float().numpy()]
            past, tokens = out.past_key_values, []
            for _ in range(new_tokens):
                tokens.append(int(want[-1].argmax()))
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                want.append(out.logits[0, -1].float().numpy())
        engine.reset()
        got = [engine.step(ids)] + [engine.step([t]) for t in tokens]
        errors = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
        agree = [int(g.argmax()) == int(w.argmax()) for g, w in zip(got, want)]
        identical = next((i for i, a in enumerate(agree) if not a), len(agree))
        reports.append(PromptReport(text, len(ids), max(errors), sum(agree) / len(agree), min(identical, new_tokens),
                                    new_tokens, float(max(np.abs(w).max() for w in want))))
    return reports
