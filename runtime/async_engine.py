"""The engine loop on its own thread, for an asyncio server.

The server's event loop never runs a kernel: it hands requests to the engine thread through a
command queue and receives each request's outputs on an ``asyncio.Queue`` (delivered with
``call_soon_threadsafe``). The engine thread runs ``Engine.iterate`` while there is work and
sleeps on an event otherwise. A consumer that stops listening (a client disconnect cancels
its task) aborts its request, which frees its blocks at the next iteration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from typing import AsyncIterator, Optional, Sequence

from .engine import Engine, RequestOutput
from .sampler import SamplingParams

log = logging.getLogger("llmc.engine")


class EngineDeadError(RuntimeError):
    """The engine thread is not running (stopped, or a step failed)."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="llmc-engine", daemon=True)
        self.accepting = True
        self.iterations = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    @property
    def active_requests(self) -> int:
        """Requests started through ``generate`` and not yet finished or aborted."""
        return len(self._streams)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still running are aborted) and wait for the thread."""
        self.accepting = False
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- requests (event-loop side) -----------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, the last one ``finished``.
        Raises ValueError for a prompt the engine cannot serve, EngineDeadError when stopped."""
        if not self.alive or not self.accepting:
            raise EngineDeadError("the server is shutting down")
        self.engine.check_prompt(prompt_ids)
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._command(("add", rid, list(prompt_ids), params))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._command(("abort", rid))

    def _command(self, command) -> None:
        self._commands.append(command)
        self._wake.set()

    # --- the engine thread --------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed
                pass

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, handed to each event loop in one wake-up (not one per request:
        each ``call_soon_threadsafe`` writes the loop's self-pipe and costs the loop a turn)."""
        by_loop: dict = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                loop, queue = stream
                by_loop.setdefault(loop, []).append((queue, out))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # the loop is closed
                pass

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, rid, prompt, params = command
                if rid not in self._streams:
                    continue  # its consumer is already gone
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except ValueError as exc:
                    self._deliver(rid, exc)
            else:
                self.engine.abort(command[1])

    def _run(self) -> None:
        while not self._stop:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.iterate()
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"the engine step failed: {exc}"))
                continue
            self.iterations += 1
            self._deliver_all(outputs)
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(rid, EngineDeadError("the server shut down before the request finished"))


def _put_all(pairs) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)


__all__ = ["AsyncEngine", "EngineDeadError"]
