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
