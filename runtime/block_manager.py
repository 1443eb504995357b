"""KV blocks for many sequences: a reference-counted allocator with automatic prefix caching.

The executor owns ``num_blocks`` blocks per layer pool; this module decides which sequence
holds which. A block that is full of computed tokens is registered under a hash of its tokens
chained with the hash of every block before it, so two requests sharing a prompt prefix share
the blocks holding it (reference counts say how many sequences hold a block). A freed block
keeps its hash and contents until the pool needs it again: free cached blocks are reused
least recently used first, so a prefix seen a moment ago is still there for the next request.

A sequence's last, partly filled block is published too, under one key per filled length
(``partial``: only with an executor that can copy blocks). A request whose prompt continues a
cached chain with those tokens gets a private copy of that block (copy on write: the owner
keeps appending to the original) and computes from there, so a repeated prompt recomputes its
last token only instead of everything after its last full block (up to block_size - 1 tokens;
a warm SmolLM2 prompt's time to first token ~14 -> ~5 ms). The copies are queued here and run
by the engine before the step that writes into them (``run_copies``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens and (through ``parent``) every token before them."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class SeqBlocks:
    """One sequence's blocks: ``table[i]`` holds positions i*block_size .. (i+1)*block_size-1."""

    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the first len(hashes) (full) blocks
    partial_upto: int = 0  # filled lengths of block len(hashes) published so far (partial keys)


class BlockManager:
    """Allocates blocks to sequences, shares full blocks by content, evicts free ones LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 partial: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.partial = partial and enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Free blocks without a hash, taken from the right: the most recently freed first. Their
        # pages are resident (and maybe cached) already, whereas a never-used block's pages are
        # still lazily mapped zeros, and first writes to them page-fault (a 512-token prefill
        # on fresh blocks spent ~3% of its time in kv_append's page faults).
        self._uncached_free: deque[int] = deque(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._partial: dict[bytes, int] = {}  # key of a partly filled prefix of a block -> the block
        self._partials_of: dict[int, list[bytes]] = {}
        self._copies: list[tuple[int, int]] = []  # (source, destination) to run before the next step
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0     # of those, found in the cache
        self.partial_hits = 0    # prompts that also reused a partly filled block (copied)

    # --- pool state ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (unused ones and free cached ones)."""
        return len(self._uncached_free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def blocks_needed(self, seq: SeqBlocks, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs to hold ``num_tokens`` positions."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.table))

    # --- allocation ---------------------------------------------------------------------------
    def _take(self) -> int:
        if self._uncached_free:
            block = self._uncached_free.pop()
        else:
            block, _ = self._cached_free.popitem(last=False)  # evict the least recently used
            self._forget(block)
        self.ref_count[block] = 1
        return block

    def _forget(self, block: int) -> None:
        """Drop every key of ``block`` (its contents are about to change)."""
        if block in self._hash_of:
            del self._by_hash[self._hash_of.pop(block)]
        for key in self._partials_of.pop(block, ()):
            del self._partial[key]

    def _cached(self, block: int) -> bool:
        return block in self._hash_of or block in self._partials_of

    def allocate(self, seq: SeqBlocks, num_tokens: int) -> bool:
        """Grow ``seq`` to hold ``num_tokens`` positions; False (and nothing taken) if the pool
        has too few free blocks."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.table.append(self._take())
        return True

    def free(self, seq: SeqBlocks) -> None:
        """Release ``seq``'s blocks. Tail blocks go first into the LRU order, so a later
        eviction takes a sequence's last blocks before its (more shareable) first ones."""
        for block in reversed(seq.table):
            self._unpin(block)
        mine = set(seq.table)  # a copy into a block given back is void (its source unpinned)
        for src, dst in [c for c in self._copies if c[1] in mine]:
            self._copies.remove((src, dst))
            self._unpin(src)
        seq.table.clear()
        seq.hashes.clear()
        seq.partial_upto = 0

    # --- prefix caching -----------------------------------------------------------------------
    def _chain(self, seq: SeqBlocks, tokens: Sequence[int], upto_blocks: int) -> None:
        """Extend ``seq.hashes`` to the first ``upto_blocks`` full blocks of ``tokens``."""
        bs = self.block_size
        while len(seq.hashes) < upto_blocks:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes.append(block_hash(parent, tokens[i * bs:(i + 1) * bs]))

    def match_prefix(self, seq: SeqBlocks, tokens: Sequence[int]) -> int:
        """Give an empty ``seq`` the cached blocks of ``tokens``' longest cached prefix; returns
        how many tokens they hold. The last token is always left to compute (its logits are
        needed), so at most (len(tokens) - 1) // block_size blocks match."""
        if seq.table:
            raise RuntimeError("match_prefix needs a sequence without blocks")
        if not self.enable_prefix_caching or len(tokens) < 2:
            return 0
        full = (len(tokens) - 1) // self.block_size
        self._chain(seq, tokens, full)
        self.prefix_queries += full
        for h in seq.hashes[:full]:
            block = self._by_hash.get(h)
            if block is None:
                break
            self._pin(block)
            seq.table.append(block)
        self.prefix_hits += len(seq.table)
        del seq.hashes[len(seq.table):]
        matched = len(seq.table) * self.block_size
        if self.partial and len(seq.table) == full:
            matched += self._match_partial(seq, tokens, len(tokens) - 1 - matched)
        return matched

    def _match_partial(self, seq: SeqBlocks, tokens: Sequence[int], room: int) -> int:
        """The longest cached partly filled block continuing ``seq``'s chain with up to
        ``room`` of ``tokens``: copied into a fresh block of ``seq``; returns its filled length."""
        bs, at = self.block_size, len(seq.table) * self.block_size
        parent = seq.hashes[-1] if seq.hashes else b""
        for r in range(min(room, bs - 1), 0, -1):
            src = self._partial.get(block_hash(parent, tokens[at:at + r]))
            if src is None:
                continue
            self._pin(src)  # held until the copy ran: neither evicted nor handed out before
            if not self._uncached_free and not self._cached_free:
                self._unpin(src)
                return 0
            dst = self._take()
            seq.table.append(dst)
            self._copies.append((src, dst))
            self.partial_hits += 1
            return r
        return 0

    def _pin(self, block: int) -> None:
        """Take one more reference (a free cached block leaves the LRU order)."""
        if self.ref_count[block] == 0:
            del self._cached_free[block]
        self.ref_count[block] += 1

    def _unpin(self, block: int) -> None:
        """Drop one reference; the last one returns the block to a free list."""
        self.ref_count[block] -= 1
        if self.ref_count[block] < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        if self.ref_count[block] == 0:
            if self._cached(block):
                self._cached_free[block] = None
            else:
                self._uncached_free.append(block)

    def run_copies(self, copy_blocks) -> None:
        """Run the queued block copies (``copy_blocks([(src, dst), ...])``, the executor's) and
        release their sources. The engine calls this after scheduling, before the step."""
        copies, self._copies = self._copies, []
        if copies:
            copy_blocks(copies)
        for src, _ in copies:
            self._unpin(src)

    def register(self, seq: SeqBlocks, tokens: Sequence[int], num_computed: int) -> None:
        """Publish ``seq``'s blocks that are now full of computed tokens under their hashes.
        A block whose content another block already holds stays private (no duplicates)."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed // self.block_size, len(seq.table))
        start = len(seq.hashes)
        self._chain(seq, tokens, full)
        for i in range(start, full):
            h, block = seq.hashes[i], seq.table[i]
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h] = block
                self._hash_of[block] = h
        if full > start:
            seq.partial_upto = 0
        filled = num_computed - full * self.block_size
        if self.partial and 0 < filled and full < len(seq.table) and len(seq.hashes) == full:
            parent, at, block = seq.hashes[-1] if seq.hashes else b"", full * self.block_size, seq.table[full]
            for r in range(seq.partial_upto + 1, filled + 1):  # one key per filled length
                key = block_hash(parent, tokens[at:at + r])
                if key not in self._partial:
                    self._partial[key] = block
                    self._partials_of.setdefault(block, []).append(key)
            seq.partial_upto = max(seq.partial_upto, filled)

    def reset_prefix_cache(self) -> None:
        """Forget every free cached block's hash (their contents become plain free blocks)."""
        for block in list(self._cached_free):
            self._forget(block)
            self._uncached_free.append(block)
        self._cached_free.clear()

    def check(self) -> None:
        """Assert the bookkeeping is consistent (tests call this after every step)."""
        free = set(self._uncached_free) | set(self._cached_free)
        assert len(free) == len(self._uncached_free) + len(self._cached_free), "a block is free twice"
        for b in range(self.num_blocks):
            assert (self.ref_count[b] == 0) == (b in free), f"block {b}: ref {self.ref_count[b]}, free {b in free}"
        for h, b in self._by_hash.items():
            assert self._hash_of[b] == h
        assert all(self._cached(b) for b in self._cached_free)
        for key, b in self._partial.items():
            assert key in self._partials_of[b]
        assert sum(map(len, self._partials_of.values())) == len(self._partial)


__all__ = ["BlockManager", "SeqBlocks", "block_hash"]
