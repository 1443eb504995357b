"""The block allocator: reference counts, prefix caching by chained hashes, LRU eviction."""

import pytest

from llmc.runtime.block_manager import BlockManager, SeqBlocks


def filled(bm, tokens):
    """A sequence that computed ``tokens`` (blocks allocated and registered)."""
    seq = SeqBlocks()
    computed = bm.match_prefix(seq, tokens)
    assert bm.allocate(seq, len(tokens))
    bm.register(seq, tokens, len(tokens))
    return seq, computed


def test_allocate_and_free_count_blocks():
    bm = BlockManager(8, 4)
    seq = SeqBlocks()
    assert bm.allocate(seq, 9) and len(seq.table) == 3 and bm.num_free == 5
    assert bm.allocate(seq, 12) and len(seq.table) == 3  # still fits
    assert not bm.allocate(SeqBlocks(), 4 * 6)  # needs 6, 5 free: nothing taken
    assert bm.num_free == 5
    bm.free(seq)
    assert bm.num_free == 8 and seq.table == []
    bm.check()


def test_shared_prefix_reuses_blocks_and_counts_references():
    bm = BlockManager(16, 4)
    a, computed = filled(bm, list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    assert computed == 0
    b = SeqBlocks()
    assert bm.match_prefix(b, list(range(9)) + [99]) == 8  # both full blocks match
    assert b.table == a.table[:2]
    assert [bm.ref_count[x] for x in b.table] == [2, 2]
    assert bm.prefix_hits == 2
    # a different first block changes every later hash (the chain), even with equal tokens after it
    c = SeqBlocks()
    assert bm.match_prefix(c, [7, 1, 2, 3, 4, 5, 6, 7, 8]) == 0
    bm.free(a)
    bm.free(b)
    bm.check()
    assert bm.num_used == 0 and bm.num_cached == 2  # still cached while free


def test_the_last_token_is_never_served_from_the_cache():
    bm = BlockManager(16, 4)
    filled(bm, list(range(8)))
    assert bm.match_prefix(SeqBlocks(), list(range(8))) == 4  # the second block holds the last token


def test_free_cached_blocks_are_evicted_least_recently_used():
    bm = BlockManager(4, 2)
    old, _ = filled(bm, [1, 2, 3])  # one full cached block
    new, _ = filled(bm, [5, 6, 7])
    bm.free(old)
    bm.free(new)
    hog = SeqBlocks()
    assert bm.allocate(hog, 2 * 3)  # 2 uncached + the least recently freed cached block (old's)
    assert bm.match_prefix(SeqBlocks(), [1, 2, 3]) == 0
    assert bm.match_prefix(SeqBlocks(), [5, 6, 7]) == 2
    bm.free(hog)


def test_double_free_is_caught():
    bm = BlockManager(4, 2)
    seq = SeqBlocks()
    bm.allocate(seq, 2)
    table = list(seq.table)
    bm.free(seq)
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free(SeqBlocks(table=table))


def test_caching_off_shares_nothing():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    filled(bm, [1, 2, 3, 4, 5])
    assert bm.match_prefix(SeqBlocks(), [1, 2, 3, 4, 5]) == 0 and bm.num_cached == 0


def test_partly_filled_block_is_shared_by_a_copy():
    """A prompt continuing a cached chain with the tokens of a partly filled block gets a copy
    of that block (the owner keeps appending to the original) and computes from there."""
    bm = BlockManager(16, 4, partial=True)
    a, _ = filled(bm, list(range(10)))  # [0..3] [4..7] full; [8, 9]: keys for 1 and 2 filled
    b = SeqBlocks()
    assert bm.match_prefix(b, list(range(10))) == 9  # the last token is left to compute
    assert b.table[:2] == a.table[:2] and b.table[2] not in a.table
    assert bm.ref_count[a.table[2]] == 2  # the source is pinned until the copy ran
    bm.check()
    copies = []
    bm.run_copies(copies.extend)
    assert copies == [(a.table[2], b.table[2])] and bm.ref_count[a.table[2]] == 1
    assert bm.partial_hits == 1
    c = SeqBlocks()  # continues differently after the full blocks: nothing partial to share
    assert bm.match_prefix(c, list(range(8)) + [7, 7]) == 8 and len(c.table) == 2
    d = SeqBlocks()  # continues with both filled tokens and more
    assert bm.match_prefix(d, list(range(10)) + [5, 6]) == 10
    bm.run_copies(copies.extend)
    assert copies[-1] == (a.table[2], d.table[2])
    bm.check()


def test_partial_keys_grow_as_the_block_fills():
    bm = BlockManager(16, 4, partial=True)
    tokens = list(range(10))
    a, _ = filled(bm, tokens)
    tokens.append(42)  # a decode step wrote position 10 into the same block
    bm.register(a, tokens, 11)
    b = SeqBlocks()
    assert bm.match_prefix(b, tokens + [1]) == 11
    tokens.append(43)  # the block is full now: a full key, and the next block starts empty
    assert bm.allocate(a, 12)
    bm.register(a, tokens, 12)
    e = SeqBlocks()
    assert bm.match_prefix(e, tokens + [9]) == 12 and e.table == a.table[:3]
    bm.run_copies(lambda pairs: None)
    bm.check()


def test_a_copy_into_a_freed_block_is_void_and_evicted_blocks_forget_their_keys():
    bm = BlockManager(6, 4, partial=True)
    a, _ = filled(bm, list(range(10)))
    b = SeqBlocks()
    assert bm.match_prefix(b, list(range(10))) == 9
    bm.free(b)  # e.g. a request that could not get its remaining blocks
    assert bm.ref_count[a.table[2]] == 1
    called = []
    bm.run_copies(called.append)
    assert called == []
    bm.free(a)
    bm.check()
    hog = SeqBlocks()
    assert bm.allocate(hog, 6 * 4)  # every block, cached ones evicted
    bm.free(hog)
    c = SeqBlocks()
    assert bm.match_prefix(c, list(range(10))) == 0 and bm.partial_hits == 1
    bm.check()


def test_partial_sharing_is_off_unless_asked():
    bm = BlockManager(16, 4)
    filled(bm, list(range(10)))
    b = SeqBlocks()
    assert bm.match_prefix(b, list(range(10))) == 8 and bm.partial_hits == 0
