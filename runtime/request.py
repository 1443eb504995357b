"""One generation request as the scheduler and engine track it.

The tokens a request holds are its prompt followed by its output so far; ``num_computed`` of
them have their K/V in the cache. Preemption by recompute frees the blocks and sets
``num_computed`` back to 0 (or to what the prefix cache still holds): the request later
prefills prompt and output again and continues with the same sampler, so its output is the
one it would have produced without the interruption.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .block_manager import SeqBlocks
from .sampler import Sample, Sampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    num_computed: int = 0
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    num_cached_prompt: int = 0   # prompt tokens the prefix cache supplied on first admission
    preemptions: int = 0
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    sampler: Sampler = field(init=False)
    matcher: Any = None  # a GrammarMatcher when params.grammar constrains the output
    # with params.prompt_logprobs: one Sample per prompt position (None for the first token)
    prompt_logprobs: Optional[list] = None
    # speculative decoding: guessed next tokens, appended to ``tokens`` for one step only; the
    # next guess's length follows how much of the last one held, and after guesses that all
    # failed the request waits before guessing again (text that does not repeat should not pay
    # for checking guesses every step)
    draft: list[int] = field(default_factory=list)
    guess_len: int = 0       # the next guess's length (0: the engine's speculative_tokens)
    guess_misses: int = 0
    guess_wait: int = 0
    tokens: list[int] = field(init=False)

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.tokens = list(self.prompt_ids)  # prompt + output, grows as tokens are sampled

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    def append(self, sample: Sample) -> None:
        self.output_ids.append(sample.token)
        self.samples.append(sample)
        self.tokens.append(sample.token)


__all__ = ["Request", "Status"]
