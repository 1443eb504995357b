"""A tiny numpy stand-in for a compiled model, implementing runtime.step.Executor, and a
byte-level tokenizer for it, so scheduler, engine and server tests need no compile.

The fake keeps a real paged KV pool: each slot stores the token id and position written to it.
The logits for a sequence are a pseudo-random function of every token it holds, read back
through its block table, so a wrong slot, a wrong block table or a lost block changes the
output (and a position stored at the wrong place fails an assertion). Results do not depend
on what else is in the batch, so batched and alone runs must agree exactly.
"""

from __future__ import annotations

import time

import numpy as np

from llmc.runtime.step import StepBatch
from llmc.runtime.tokenizer import Tokenizer

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte value 0..255 (byte-level BPE's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_tokenizer(directory) -> Tokenizer:
    """Byte tokens 1..256 (id = byte + 1) and EOS = 0; written as a tokenizers JSON file."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    vocab = {EOS: 0}
    for b, ch in enumerate(byte_alphabet()):
        vocab[ch] = b + 1
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    path = f"{directory}/tokenizer.json"
    tok.save(path)
    return Tokenizer(path, chat_template=CHAT_TEMPLATE, eos_token=EOS, eos_token_ids=[0])


VOCAB = 257


class FakeExecutor:
    """Executor protocol over a token/position pool; ``delay_per_token`` simulates compute."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256,
                 vocab_size: int = VOCAB, delay_per_token: float = 0.0, delay_per_step: float = 0.0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.delay_per_token, self.delay_per_step = delay_per_token, delay_per_step
        self.tokens = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.positions = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.batches: list[tuple[int, int]] = []  # (sequences, tokens) of each step
        self.copies: list[tuple[int, int]] = []  # blocks copied (partly filled prefix blocks shared)
        printable = np.zeros(vocab_size)
        printable[ord(" ") + 1:ord("~") + 2] = 4.0  # mostly ASCII text
        printable[0] = -1.0  # EOS now and then
        self.bias = printable

    def logits_for(self, context: np.ndarray) -> np.ndarray:
        h = 1469598103934665603
        for t in context[-8:].tolist():  # the last 8 tokens and the length pick the row
            h = ((h ^ (t + 1)) * 1099511628211) % (1 << 63)
        h = (h + 7919 * len(context)) % (1 << 63)
        return (np.random.default_rng(h).normal(size=self.vocab_size) + self.bias).astype(np.float32)

    def copy_blocks(self, pairs) -> None:
        bs = self.block_size
        for src, dst in pairs:
            self.tokens[dst * bs:(dst + 1) * bs] = self.tokens[src * bs:(src + 1) * bs]
            self.positions[dst * bs:(dst + 1) * bs] = self.positions[src * bs:(src + 1) * bs]
        self.copies.extend(pairs)

    def step(self, batch: StepBatch) -> np.ndarray:
        batch.validate(self.num_blocks, self.block_size, self.vocab_size)
        bs = self.block_size
        keep = batch.slot_mapping >= 0
        self.tokens[batch.slot_mapping[keep]] = batch.input_ids[keep]
        self.positions[batch.slot_mapping[keep]] = batch.positions[keep]
        out = np.empty((batch.num_seqs, self.vocab_size), dtype=np.float32)
        for b in range(batch.num_seqs):
            row = int(batch.logits_index[b])
            length = int(batch.positions[row]) + 1
            pos = np.arange(length)
            slots = batch.block_tables[b][pos // bs] * bs + pos % bs
            assert np.array_equal(self.positions[slots], pos), "a slot holds another position: wrong block table"
            out[b] = self.logits_for(self.tokens[slots])
        self.batches.append((batch.num_seqs, batch.num_tokens))
        delay = self.delay_per_step + self.delay_per_token * batch.num_tokens
        if delay:
            time.sleep(delay)
        return out


class Repeating(FakeExecutor):
    """Greedy continuation: the token ``period`` positions back, except every 7th position,
    where the pseudo-random logits of the plain fake decide (so some guesses fail)."""

    period = 5

    def logits_for(self, context):
        logits = super().logits_for(context)
        if len(context) % 7 and len(context) >= self.period:
            logits[int(context[-self.period])] += 50.0
        return logits


def run_requests(engine, prompts, params, check_blocks: bool = False) -> list[tuple[list[int], str, str]]:
    """Add one request per prompt (``params``: one SamplingParams for all, or a list), iterate
    the engine to the end; (tokens, text, finish reason) per request. Every block is free again
    at the end (and, with ``check_blocks``, the block manager's invariants hold every step)."""
    reqs = [engine.add_request(p, params[i] if isinstance(params, list) else params) for i, p in enumerate(prompts)]
    tokens, text, reasons = {r.request_id: [] for r in reqs}, {r.request_id: "" for r in reqs}, {}
    while engine.has_unfinished():
        for out in engine.iterate():
            tokens[out.request_id] += out.new_token_ids
            text[out.request_id] += out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if check_blocks:
            engine.blocks.check()
    assert engine.blocks.num_used == 0
    return [(tokens[r.request_id], text[r.request_id], reasons[r.request_id]) for r in reqs]


def alone_reference(prompt_ids, max_tokens: int, vocab_size: int = VOCAB, eos: int = 0) -> list[int]:
    """Greedy tokens straight from the fake's function, without any engine (the ground truth)."""
    ex = FakeExecutor(vocab_size=vocab_size)
    context, out = list(prompt_ids), []
    while len(out) < max_tokens:
        token = int(np.argmax(ex.logits_for(np.asarray(context))))
        out.append(token)
        if token == eos:
            break
        context.append(token)
    return out
