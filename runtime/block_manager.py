"""KV blocks for many sequences: a reference-counted allocator with automatic prefix caching.

The executor owns ``num_blocks`` blocks per layer pool; this module decides which sequence
holds which. A block that is full of computed tokens is registered under a hash of its tokens
chained with the hash of every block before it, so two requests sharing a prompt prefix share
the blocks holding it (reference counts say how many sequences hold a block). A freed block
keeps its hash and contents until the pool needs it again: free cached blocks are reused
least recently used first, so a prefix seen a moment ago is still there for the next request.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens and (through ``parent``) every token before them."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class SeqBlocks:
    """One sequence's blocks: ``table[i]`` holds positions i*block_size .. (i+1)*block_size-1."""

    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the first len(hashes) (full) blocks


class BlockManager:
    """Allocates blocks to sequences, shares full blocks by content, evicts free ones LRU."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # Free blocks without a hash, taken from the right: the most recently freed first. Their
        # pages are resident (and maybe cached) already, whereas a never-used block's pages are
        # still lazily mapped zeros, and first writes to them page-fault (a 512-token prefill
        # on fresh blocks spent ~3% of its time in kv_append's page faults).
        self._uncached_free: deque[int] = deque(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0     # of those, found in the cache

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
            del self._by_hash[self._hash_of.pop(block)]
        self.ref_count[block] = 1
        return block

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
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            if self.ref_count[block] == 0:
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    self._uncached_free.append(block)
        seq.table.clear()
        seq.hashes.clear()

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
            if self.ref_count[block] == 0:
                del self._cached_free[block]
            self.ref_count[block] += 1
            seq.table.append(block)
        self.prefix_hits += len(seq.table)
        del seq.hashes[len(seq.table):]
        return len(seq.table) * self.block_size

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

    def reset_prefix_cache(self) -> None:
        """Forget every free cached block's hash (their contents become plain free blocks)."""
        for block in list(self._cached_free):
            del self._by_hash[self._hash_of.pop(block)]
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
        assert all(b in self._hash_of for b in self._cached_free)


__all__ = ["BlockManager", "SeqBlocks", "block_hash"]
