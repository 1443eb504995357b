"""The engine with a recurrent-state model (a fake executor that keeps per-slot state): each
running sequence owns one state slot, a sequence's first step starts its slot afresh, slots
are reused after a request ends or is preempted, and prefix caching is off. A shared, stale
or lost slot changes the fake's output, so batched results must equal alone results."""

import numpy as np
import pytest

from llmc.runtime.engine import Engine
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.step import StepBatch
from tests.runtime.fake import FakeExecutor, alone_reference
from tests.runtime.test_engine import PROMPTS, run_all


class FakeStateExecutor(FakeExecutor):
    """The logits of a sequence come from its state slot alone (every token it consumed),
    as a recurrent model's do; fresh when seq_lens[b] equals the sequence's row count."""

    def __init__(self, num_state_slots: int, **kwargs):
        super().__init__(**kwargs)
        self.num_state_slots = num_state_slots
        self.states: list = [None] * num_state_slots  # None: garbage a fresh sequence must not read
        self.slot_sets: list[set] = []

    def step(self, batch: StepBatch) -> np.ndarray:
        super().step(batch)
        slots = batch.state_slots
        assert slots is not None and len(set(slots.tolist())) == batch.num_seqs, "sequences share a state slot"
        self.slot_sets.append(set(slots.tolist()))
        out = np.empty((batch.num_seqs, self.vocab_size), dtype=np.float32)
        for b in range(batch.num_seqs):
            lo, hi = int(batch.query_start[b]), int(batch.query_start[b + 1])
            slot = int(slots[b])
            if int(batch.seq_lens[b]) == hi - lo:
                self.states[slot] = []
            assert self.states[slot] is not None, "a continuing sequence reads a slot it never wrote"
            self.states[slot] = self.states[slot] + batch.input_ids[lo:hi].tolist()
            assert len(self.states[slot]) == int(batch.seq_lens[b]), "the state is not the sequence's"
            out[b] = self.logits_for(np.asarray(self.states[slot]))
        return out


def test_state_slots_batched_equal_alone_and_are_reused():
    ex = FakeStateExecutor(num_state_slots=9, num_blocks=512)
    engine = Engine(ex, max_num_seqs=8, max_num_batched_tokens=64)
    assert not engine.blocks.enable_prefix_caching  # a slot cannot resume from cached blocks
    got, _ = run_all(engine, PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert got == [alone_reference(p, 12, eos=-1) for p in PROMPTS]
    used = set().union(*ex.slot_sets)
    assert used <= set(range(8)) and len(used) == 8  # the direct sequence's slot (8) stays out of it
    assert sorted(engine._free_slots) == list(range(8))  # all returned


def test_preemption_restarts_the_state_and_the_output_is_unchanged():
    ex = FakeStateExecutor(num_state_slots=17, num_blocks=40)
    engine = Engine(ex, max_num_seqs=16, max_num_batched_tokens=64)
    got, _ = run_all(engine, PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert got == [alone_reference(p, 24, eos=-1) for p in PROMPTS]


def test_direct_interface_and_too_many_sequences():
    ex = FakeStateExecutor(num_state_slots=3, num_blocks=64)
    engine = Engine(ex, max_num_seqs=2)
    first = engine.step([5, 6, 7])
    engine.reset()
    assert np.array_equal(engine.step([5, 6, 7]), first)  # a fresh start after reset
    with pytest.raises(ValueError, match="state slots"):
        Engine(FakeStateExecutor(num_state_slots=3, num_blocks=64), max_num_seqs=4)
