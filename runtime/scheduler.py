"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``). Running requests come first, in
admission order: a decoding request takes one token, a request still prefilling takes the
next chunk of its prompt that fits the budget (chunked prefill: a long prompt never stalls
the decoders for a whole prefill). Waiting requests are admitted first come first served
while the budget, ``max_num_seqs`` and the free blocks allow; an admitted request first takes
whatever its prompt's prefix has in the prefix cache. When a running request needs a block
and none is free, the most recently admitted running request is preempted by recompute: its
blocks are freed and it goes back to the head of the queue (see request.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, Status


@dataclass
class SchedulerOutput:
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, "
                             f"{max_num_batched_tokens}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.blocks)
        request.num_computed = 0
        request.status = Status.WAITING
        request.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_pending, budget)
            while not self.blocks.allocate(req.blocks, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # it was the last one left to preempt
            out.chunks.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if not req.blocks.table and req.params.prompt_logprobs is None:  # scoring computes every position
                req.num_computed = self.blocks.match_prefix(req.blocks, req.tokens)
                if req.preemptions == 0:
                    req.num_cached_prompt = req.num_computed
            n = min(req.num_pending, budget)
            if not self.blocks.allocate(req.blocks, req.num_computed + n):
                self.blocks.free(req.blocks)  # hold nothing while waiting (no deadlock on shared blocks)
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.chunks.append((req, n))
            budget -= n
        return out

    def finish(self, request: Request, reason: str) -> None:
        """Remove a request (finished or aborted) from the queues and free its blocks."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.blocks)
        request.status = Status.FINISHED
        request.finish_reason = reason


__all__ = ["Scheduler", "SchedulerOutput"]
