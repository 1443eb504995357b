"""choices.start when one prompt is refused while another prompt's first sample still waits:
the refusal is raised, and the waiting request is aborted at once (its stream closed), not
left running until its generator is garbage-collected."""

import asyncio

import pytest

from llmc.runtime import choices


def test_a_refused_prompt_aborts_the_choices_still_starting():
    closed = []

    async def generate(ids, params, rid):
        try:
            if ids == [0]:
                raise ValueError("the prompt is empty")
            await asyncio.Event().wait()  # never produces a first output
            yield None
        finally:
            closed.append(rid)

    async def run():
        with pytest.raises(choices.PromptRefused, match="empty"):
            await choices.start(generate, [[1, 2], [0]], 2, lambda p, s: None, "r")
        return sorted(closed)  # before the loop's shutdown cancels anything left over

    assert asyncio.run(run()) == ["r-0", "r-2"]  # both leaders ended; the samples never started
