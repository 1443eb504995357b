"""Test-side driver for the paged step: per-layer pools, block tables with shuffled blocks, and
the step inputs of DESIGN.md for any mix of sequences, run through the reference interpreter
(or any other function that takes the step's inputs and returns logits plus updated pools).

The blocks each sequence gets are drawn at random from the pool, so a kernel or pass that
assumed contiguous blocks fails here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from llmc.compiler.ir import Interpreter, KVCache, Module

StepFn = Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]


def pool_args(module: Module) -> list:
    fn = module.functions["forward"]
    return [a for a in fn.args if a.name.startswith(("k_pool_", "v_pool_", "state_pool_"))]


class PagedBatcher:
    """Owns pools and block tables for sequences of a paged module; ``step`` runs one batch."""

    def __init__(self, module: Module, num_blocks: int = 64, seed: int = 0):
        self.module = module
        self.pools = {}
        for a in pool_args(module):
            shape = [num_blocks] + [int(d) for d in a.type.shape[1:]]
            self.pools[a.name] = torch.zeros(shape, dtype=torch.float32)
        self.block_size = int(pool_args(module)[0].type.shape[1])
        self.num_blocks = num_blocks
        self.state_slots: dict[object, int] = {}  # recurrent state slot per sequence (num_blocks slots)
        self.generator = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=self.generator).tolist()
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    def _slots(self, seq, positions: torch.Tensor) -> torch.Tensor:
        table = self.tables.setdefault(seq, [])
        needed = -(-(int(positions.max()) + 1) // self.block_size)
        while len(table) < needed:
            table.append(self.free.pop())
        t = torch.tensor(table, dtype=torch.int64)
        return t[positions // self.block_size] * self.block_size + positions % self.block_size

    def inputs(self, chunks: list[tuple[object, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The step inputs for ``chunks``: (sequence key, its next token ids) in batch order."""
        ids, positions, slots, starts, lens, rows = [], [], [], [0], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            pos = torch.arange(start, start + len(tokens))
            ids.append(tokens.to(torch.int64))
            positions.append(pos)
            slots.append(self._slots(seq, pos))
            starts.append(starts[-1] + len(tokens))
            lens.append(start + len(tokens))
            rows.append(starts[-1] - 1)
        width = max(len(self.tables[seq]) for seq, _ in chunks)
        tables = torch.full((len(chunks), width), 0, dtype=torch.int64)
        for b, (seq, _) in enumerate(chunks):
            tables[b, :len(self.tables[seq])] = torch.tensor(self.tables[seq])
        out = dict(input_ids=torch.cat(ids), positions=torch.cat(positions), slot_mapping=torch.cat(slots),
                   block_tables=tables, seq_lens=torch.tensor(lens), query_start=torch.tensor(starts),
                   logits_index=torch.tensor(rows),
                   state_slots=torch.tensor([self.state_slots.setdefault(seq, (7 * len(self.state_slots) + 3) % self.num_blocks)
                                             for seq, _ in chunks]))
        names = {a.name for a in self.module.functions["forward"].args}
        out = {k: v for k, v in out.items() if k in names}
        out.update(self.pools)
        return out

    def step(self, chunks: list[tuple[object, torch.Tensor]], run: Optional[StepFn] = None,
             weights=None) -> torch.Tensor:
        """Run one batch; returns the logits (one row per sequence when logits are selected)."""
        inputs = self.inputs(chunks)
        if run is None:
            run = Interpreter(self.module, weights).run
        outs = run(inputs)
        names = [a.name for a in pool_args(self.module)]
        for name, pool in zip(names, outs[1:]):
            self.pools[name] = pool
        for seq, tokens in chunks:
            self.lengths[seq] = self.lengths.get(seq, 0) + len(tokens)
        return outs[0]


def alone_logits(module: Module, weights, tokens: torch.Tensor, chunk_sizes: list[int]) -> list[torch.Tensor]:
    """Logits of the last token of each chunk, running one sequence through the unpaged module
    (``attention`` with its own KV cache): the reference a batched run must reproduce."""
    interp = Interpreter(module, weights, KVCache())
    out, pos = [], 0
    for n in chunk_sizes:
        inputs = {"input_ids": tokens[pos:pos + n], "positions": torch.arange(pos, pos + n)}
        if any(a.name == "logits_index" for a in module.functions["forward"].args):
            inputs["logits_index"] = torch.tensor([n - 1])
        logits = interp.run(inputs)[0]
        out.append(logits[-1])
        pos += n
    return out


# A schedule of mixed steps over four sequences: prefill chunks, decode tokens, a sequence
# joining late and one finishing early. Each entry: (sequence, number of tokens).
MIXED_SCHEDULE = [
    [(0, 9), (1, 3)],
    [(0, 1), (1, 6), (2, 13)],
    [(0, 1), (1, 1), (2, 1), (3, 5)],
    [(1, 1), (2, 1), (3, 1)],
    [(2, 7), (3, 1), (0, 1)],
]


def check_mixed_batches(before: Module, after: Module, weights, vocab: int, atol: float = 1e-5,
                        run: Optional[StepFn] = None, num_blocks: int = 64, seed: int = 0) -> float:
    """Run MIXED_SCHEDULE through the paged module ``after`` (batched) and each sequence alone
    through ``before``; assert every sequence's logits agree. Returns the largest difference."""
    g = torch.Generator().manual_seed(seed)
    totals: dict[int, list[int]] = {}
    for step in MIXED_SCHEDULE:
        for seq, n in step:
            totals.setdefault(seq, []).append(n)
    tokens = {seq: torch.randint(0, vocab, (sum(ns),), generator=g) for seq, ns in totals.items()}
    want = {seq: alone_logits(before, weights, tokens[seq], ns) for seq, ns in totals.items()}
    batcher = PagedBatcher(after, num_blocks=num_blocks, seed=seed)
    seen = {seq: 0 for seq in totals}
    done = {seq: 0 for seq in totals}
    worst = 0.0
    for step in MIXED_SCHEDULE:
        chunks = []
        for seq, n in step:
            chunks.append((seq, tokens[seq][seen[seq]:seen[seq] + n]))
            seen[seq] += n
        logits = batcher.step(chunks, run=run, weights=weights)
        selected = any(a.name == "logits_index" for a in after.functions["forward"].args)
        ends = torch.cumsum(torch.tensor([n for _, n in step]), 0) - 1  # without logits_index: one row per token
        for b, (seq, _) in enumerate(step):
            row = logits[b] if selected else logits[ends[b]]
            diff = float((row - want[seq][done[seq]]).abs().max())
            assert diff <= atol, f"sequence {seq}, chunk {done[seq]}: max logit difference {diff} > {atol}"
            worst = max(worst, diff)
            done[seq] += 1
    return worst
