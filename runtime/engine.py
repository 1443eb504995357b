"""Engine: load an artifact, keep one sequence's state, run steps and generate tokens.

One sequence for now (the CPU issue); the step interface already carries positions and
logits_index, so batching changes the scheduler, not the kernels."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .artifact import ArtifactError, check_target, read_manifest
from .cpu_features import cpu_flags
from .sampler import Sampler, SamplingParams
from .step import StepBatch
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""


class Engine:
    def __init__(self, manifest, executor, tokenizer: Optional[Tokenizer]):
        self.manifest = manifest
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_seq_len = min(executor.max_model_len, executor.num_blocks * executor.block_size)
        self.vocab_size = int(manifest.model.get("vocab_size", 0)) or None
        self.position = 0
        self.stats = GenerationStats()

    @classmethod
    def load(cls, path: str, threads: Optional[int] = None, verify_checksums: bool = True) -> "Engine":
        """Validate and load an artifact (format version, checksums, target, CPU features)."""
        manifest = read_manifest(path, verify_checksums=verify_checksums)
        check_target(manifest, "cpu", cpu_flags() or None)
        from .executor_cpu import CpuExecutor

        executor = CpuExecutor(manifest, threads)
        tok = manifest.data.get("tokenizer")
        tokenizer = None
        if tok:
            tokenizer = Tokenizer(os.path.join(path, tok["file"]), tok.get("chat_template"), tok.get("bos_token"),
                                  tok.get("eos_token"), tok.get("eos_token_ids") or [])
        return cls(manifest, executor, tokenizer)

    def reset(self) -> None:
        """Forget the sequence: the next step starts at position 0."""
        self.position = 0

    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the sequence and return the logits [vocab] of the last one."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("step needs at least one token")
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {int(ids.min())}..{int(ids.max())}")
        if self.position + ids.size > self.max_seq_len:
            raise ValueError(f"the sequence would be {self.position + ids.size} tokens, over this artifact's "
                             f"limit of {self.max_seq_len}; shorten the prompt or recompile with a larger "
                             f"--max-seq-len")
        positions = np.arange(self.position, self.position + ids.size, dtype=np.int64)
        # one sequence owning blocks 0, 1, 2, ... of the pool (the batching engine replaces this)
        bs = self.executor.block_size
        blocks = np.arange(-(-(self.position + ids.size) // bs), dtype=np.int64)
        batch = StepBatch(ids, positions, positions, blocks[None, :], np.array([self.position + ids.size]),
                          np.array([0, ids.size]), np.array([ids.size - 1]))
        logits = self.executor.step(batch)
        self.position += ids.size
        return logits[0]

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids (prompt from an empty cache); ``self.stats`` says how it went."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + 1 > self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this artifact holds at most "
                             f"{self.max_seq_len} (prompt + output); shorten it or recompile with --max-seq-len")
        sampler = Sampler(params)
        stop_ids = set(params.stop_token_ids or ()) | (self.tokenizer.eos_token_ids if self.tokenizer else set())
        self.reset()
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids))
        history = list(prompt_ids)
        t0 = time.perf_counter()
        logits = self.step(prompt_ids)
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            token = sampler.sample(logits, history)
            if token in stop_ids:
                stats.stop_reason = "stop"
                break
            history.append(token)
            stats.generated_tokens += 1
            yield token
            if stats.generated_tokens >= params.max_tokens:
                stats.stop_reason = "length"
                break
            if self.position + 1 > self.max_seq_len:
                stats.stop_reason = "context"
                break
            logits = self.step([token])
        stats.decode_seconds = time.perf_counter() - t0


__all__ = ["ArtifactError", "Engine", "GenerationStats"]
