"""The compiled step as the runtime sees it: one batch in, one logits row per sequence out.

Every executor (cpu today, cuda/rocm/metal later) implements ``Executor``; the scheduler and
engine only ever build a ``StepBatch``. The layout follows DESIGN.md's step interface: a flat
token dimension T holding this step's tokens of all sequences (prefill chunks and decode
tokens alike), a sequence dimension B, and each sequence's KV blocks named by a block table.
The executor owns the KV pools (``num_blocks`` blocks of ``block_size`` positions per layer);
which sequence holds which block is the runtime's business alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np


@dataclass
class StepBatch:
    """One step's inputs. All arrays are int64.

    input_ids [T], positions [T]: the tokens and their positions in their sequences.
    slot_mapping [T]: where each token's K/V goes (block * block_size + offset); -1 = nowhere.
    block_tables [B, MB]: each sequence's blocks in order (unused entries: any valid block id).
    seq_lens [B]: each sequence's length after this step.
    query_start [B + 1]: sequence b's tokens are rows query_start[b] .. query_start[b+1]-1 of T,
        the last tokens of the sequence (so row i of b sits at position seq_lens[b] - n_b + i).
    logits_index [B]: the row of T whose logits the step returns for sequence b.
    state_slots [B]: for models with recurrent state (a manifest "state" entry), the state slot
        each sequence owns while it runs; a sequence whose first token is in this step starts
        its slot from zeros (the kernels see seq_lens[b] == n_b), so slots need no clearing.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start: np.ndarray
    logits_index: np.ndarray
    state_slots: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def validate(self, num_blocks: int, block_size: int, vocab_size: int | None = None) -> None:
        """Raise ValueError when the arrays are inconsistent (a scheduler bug, never user input)."""
        t, b = self.num_tokens, self.num_seqs
        for name, arr, shape in (("positions", self.positions, (t,)), ("slot_mapping", self.slot_mapping, (t,)),
                                 ("query_start", self.query_start, (b + 1,)), ("logits_index", self.logits_index, (b,))):
            if arr.shape != shape:
                raise ValueError(f"step batch: {name} has shape {arr.shape}, expected {shape}")
        if self.block_tables.ndim != 2 or self.block_tables.shape[0] != b:
            raise ValueError(f"step batch: block_tables has shape {self.block_tables.shape}, expected ({b}, MB)")
        if int(self.query_start[0]) != 0 or int(self.query_start[-1]) != t or np.any(np.diff(self.query_start) < 0):
            raise ValueError(f"step batch: query_start {self.query_start.tolist()} does not cover rows 0..{t}")
        n = np.diff(self.query_start)
        if np.any(n > self.seq_lens) or np.any(self.seq_lens > self.block_tables.shape[1] * block_size):
            raise ValueError("step batch: a sequence has more tokens than its seq_len or its block table holds")
        if t and (int(self.slot_mapping.max()) >= num_blocks * block_size):
            raise ValueError("step batch: a slot lies outside the KV pool")
        if self.block_tables.size and (int(self.block_tables.min()) < 0 or int(self.block_tables.max()) >= num_blocks):
            raise ValueError("step batch: a block table names a block outside the KV pool")
        if vocab_size is not None and t and (int(self.input_ids.min()) < 0 or int(self.input_ids.max()) >= vocab_size):
            raise ValueError(f"step batch: token id outside [0, {vocab_size})")


class Executor(Protocol):
    """Runs an artifact's compiled step over KV pools it owns."""

    block_size: int      # positions per KV block
    num_blocks: int      # blocks per layer pool, fixed when the executor is created
    max_model_len: int   # most tokens one sequence may hold (prompt + output)
    vocab_size: int

    def step(self, batch: StepBatch) -> np.ndarray:
        """Run the step; returns float32 logits [B, vocab], row b for token logits_index[b]."""
        ...
