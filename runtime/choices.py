"""The choices of one API request (``n`` samples of each of its prompts), run as engine
requests side by side: started, merged into one stream of outputs, or collected.

Each choice is its own engine request. The first choice of a prompt starts alone; the others
start once it has produced its first token, so its prompt's full blocks are in the prefix
cache by then (and the last, partly filled one is copied): ``n`` samples prefill their prompt
once, not ``n`` times.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence

from .engine import RequestOutput
from .sampler import SamplingParams


class PromptRefused(ValueError):
    """The engine refused a prompt (e.g. too long for its KV pool)."""


@dataclass(eq=False)  # hashed by identity: outputs are keyed by their choice
class Choice:
    index: int                 # the API's choice index: prompt * n + sample
    prompt: int                # which of the request's prompts
    gen: AsyncIterator[RequestOutput]
    first: Optional[RequestOutput] = None


async def _first(choice: Choice) -> None:
    try:
        choice.first = await choice.gen.__anext__()
    except ValueError as exc:
        raise PromptRefused(str(exc)) from None


async def start(generate: Callable[[Sequence[int], SamplingParams, str], AsyncIterator[RequestOutput]],
                prompts: Sequence[Sequence[int]], n: int, params: Callable[[int, int], SamplingParams],
                request_id: str) -> list[Choice]:
    """Start every choice and wait for its first output (so a refused prompt is an error
    before any response starts). ``params(prompt, sample)`` gives each choice's parameters."""
    choices = [Choice(p * n + s, p, generate(ids, params(p, s), f"{request_id}-{p * n + s}"))
               for p, ids in enumerate(prompts) for s in range(n)]
    for group in ([c for c in choices if c.index % n == 0], [c for c in choices if c.index % n]):
        tasks = [asyncio.ensure_future(_first(c)) for c in group]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # the others are still waiting on their first output: stop them (their requests
            # abort) before closing every stream
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close(choices)
            raise
    return choices


async def close(choices: Sequence[Choice], stream: Optional[AsyncIterator] = None) -> None:
    """Close ``stream`` (a ``merged`` iterator: its tasks stop), then every choice's stream
    (an unfinished one aborts its request, freeing its blocks)."""
    if stream is not None:
        await stream.aclose()
    for c in choices:
        await c.gen.aclose()


async def _outputs(choice: Choice) -> AsyncIterator[RequestOutput]:
    yield choice.first
    if not choice.first.finished:
        async for out in choice.gen:
            yield out


async def merged(choices: Sequence[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Every choice's outputs as they come, tagged with their choice. One choice is iterated
    directly (no task or queue per token on the event loop)."""
    if len(choices) == 1:
        async for out in _outputs(choices[0]):
            yield choices[0], out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for out in _outputs(choice):
                queue.put_nowait((choice, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((choice, exc))
        finally:
            queue.put_nowait((choice, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        running = len(tasks)
        while running:
            choice, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Collected:
    text: str
    samples: list
    last: RequestOutput


async def collect(choices: Sequence[Choice], disconnected: Callable[[], "asyncio.Future[bool]"],
                  poll: float = 0.25) -> Optional[list[Collected]]:
    """Every choice's whole output, in choice order; None if ``disconnected()`` turned true
    first (every request then aborted)."""
    async def consume(choice: Choice) -> Collected:
        text, samples, last = "", [], None
        async for out in _outputs(choice):
            text, samples, last = text + out.text, samples + out.new_samples, out
        return Collected(text, samples, last)

    task = asyncio.ensure_future(asyncio.gather(*(consume(c) for c in choices)))
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll)
        if done:
            return task.result()
        if await disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close(choices)
            return None
