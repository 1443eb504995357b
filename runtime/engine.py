"""The batching engine: requests in, one scheduled step at a time over an Executor, tokens out.

``Engine.iterate()`` is one iteration of continuous batching: the scheduler picks the chunks,
the engine lays them out as a ``StepBatch`` (slots and block tables from each request's
blocks), the executor runs the step, each request that finished its pending tokens samples
one (its own sampler, inside the batch), and stop conditions and text are applied. The
server drives it from its own thread (async_engine.py); ``llmc run`` and tests drive it
directly (``generate``). It knows executors only through ``runtime.step.Executor``.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .artifact import ArtifactError, check_target, read_manifest
from .block_manager import BlockManager, SeqBlocks
from .cpu_features import cpu_flags
from .detokenizer import IncrementalText
from .request import Request, Status
from .sampler import Sample, SamplingParams, sample_batch, scored_tokens
from .speculative import next_guess, propose
from .scheduler import Scheduler
from .step import Executor, StepBatch
from .structured import Grammars
from .tokenizer import Tokenizer

DEFAULT_KV_CACHE_BYTES = 512 << 20


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""


@dataclass
class RequestOutput:
    """What one request gained in one iteration."""

    request_id: str
    new_samples: list[Sample] = field(default_factory=list)
    text: str = ""                 # new final text (stop strings applied)
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop", "length", "abort"
    prompt_logprobs: Optional[list] = None  # on a request's first output, with params.prompt_logprobs
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def new_token_ids(self) -> list[int]:
        return [s.token for s in self.new_samples]


class EngineMetrics:
    """Hooks the engine calls as tokens come out (the server backs them with Prometheus)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, request: Request) -> None: ...


class Engine:
    def __init__(self, executor: Executor, tokenizer: Optional[Tokenizer] = None, manifest=None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 metrics: Optional[EngineMetrics] = None, speculative_tokens: int = 0,
                 speculative_max_seqs: int = 2):
        self.manifest = manifest
        self.executor = executor
        self.tokenizer = tokenizer
        # recurrent state (hybrid / linear-attention models): one state slot per running
        # sequence, the last one for the direct sequence. A slot holds the state after a
        # sequence's last computed token only, so cached prefix blocks cannot resume it: prefix
        # caching is off for these models (preemption recomputes from the start, which the
        # kernels treat as a fresh sequence).
        self.num_state_slots = int(getattr(executor, "num_state_slots", 0) or 0)
        if self.num_state_slots:
            enable_prefix_caching = False
            if max_num_seqs > self.num_state_slots - 1:
                raise ValueError(f"max_num_seqs {max_num_seqs} exceeds the {self.num_state_slots - 1} recurrent state "
                                 f"slots the executor holds; load it with more state slots")
        self._free_slots = list(range(max(0, self.num_state_slots - 1)))
        self._slot_of: dict[str, int] = {}
        # partly filled blocks are shared by copying them (copy on write): executors that can
        # copy a block between pool slots offer ``copy_blocks``
        self._copy_blocks = getattr(executor, "copy_blocks", None)
        self.blocks = BlockManager(executor.num_blocks, executor.block_size, enable_prefix_caching,
                                   partial=callable(self._copy_blocks))
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = min(executor.max_model_len, executor.num_blocks * executor.block_size)
        self.max_seq_len = self.max_model_len  # the single-sequence name
        self.vocab_size = int(executor.vocab_size) or None
        self.eos_token_ids = set(tokenizer.eos_token_ids) if tokenizer else set()
        # structured output: llguidance builds its token table on a request's first grammar
        self._grammars = Grammars(tokenizer.to_json, self.vocab_size or tokenizer.vocab_size,
                                  self.eos_token_ids) if tokenizer else None
        self.metrics = metrics or EngineMetrics()
        # speculative decoding (runtime/speculative.py): up to ``speculative_tokens`` guessed
        # tokens checked a step for greedy requests, while at most ``speculative_max_seqs``
        # run (a larger batch is compute-bound: extra rows would cost as much as they save).
        # Off for recurrent models, whose state cannot step back over a rejected guess.
        if speculative_tokens < 0 or speculative_max_seqs < 1:
            raise ValueError(f"speculative_tokens must be >= 0 and speculative_max_seqs >= 1, got "
                             f"{speculative_tokens}, {speculative_max_seqs}")
        self.speculative_tokens = 0 if self.num_state_slots else int(speculative_tokens)
        self.speculative_max_seqs = int(speculative_max_seqs)
        self.draft_tokens = 0      # guessed tokens checked
        self.accepted_tokens = 0   # of those, the ones greedy decoding produced
        self.requests: dict[str, Request] = {}
        self._texts: dict[str, IncrementalText] = {}
        self._ids = itertools.count()
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        # the single-sequence interface (step/reset), for tests and kernel benchmarks
        self._direct = SeqBlocks()
        self.position = 0
        self.stats = GenerationStats()

    @classmethod
    def load(cls, path: str, threads: Optional[int] = None, verify_checksums: bool = True,
             num_blocks: Optional[int] = None, kv_cache_bytes: Optional[int] = None, without_torch: bool = False,
             **kwargs) -> "Engine":
        """Validate and load an artifact (format version, checksums, target, CPU features).

        The KV pools get ``num_blocks`` blocks, by default as many as ``kv_cache_bytes``
        (512 MiB) hold, and never fewer than one full-length sequence needs. ``without_torch``
        keeps torch out of the process for a cpu artifact (see executor_cpu.keep_torch_out)."""
        manifest = read_manifest(path, verify_checksums=verify_checksums)
        kind = manifest.target.get("kind")
        gpu = kind in ("cuda", "rocm")
        if kind == "metal":
            from .executor_metal import metal_problem

            problem = metal_problem(manifest)  # before sizing pools: refuse clearly off a Mac
            if problem:
                raise ArtifactError(problem)
        elif not gpu:
            check_target(manifest, "cpu", cpu_flags() or None)
            if without_torch:
                from .executor_cpu import keep_torch_out

                keep_torch_out()
        if num_blocks is None:
            geom = manifest.kv_cache
            one_seq = -(-int(geom["max_model_len"]) // int(geom["block_size"]))
            budget = (kv_cache_bytes or DEFAULT_KV_CACHE_BYTES) // max(1, int(geom["bytes_per_block"]))
            if int(geom["bytes_per_block"]) == 0:  # no KV cache at all (attention-free recurrent models)
                budget = one_seq * (kwargs.get("max_num_seqs", 16) + 1)
            num_blocks = max(one_seq, budget)
        if gpu:
            from .executor_cuda import load_gpu_executor

            executor = load_gpu_executor(manifest, num_blocks)
        elif kind == "metal":
            from .executor_metal import MetalExecutor

            executor = MetalExecutor(manifest, num_blocks)
        else:
            from .executor_cpu import CpuExecutor

            executor = CpuExecutor(manifest, threads, num_blocks, num_state_slots=kwargs.get("max_num_seqs", 16) + 1)
        tok = manifest.data.get("tokenizer")
        tokenizer = None
        if tok:
            tokenizer = Tokenizer(os.path.join(path, tok["file"]), tok.get("chat_template"), tok.get("bos_token"),
                                  tok.get("eos_token"), tok.get("eos_token_ids") or [])
        engine = cls(executor, tokenizer, manifest, **kwargs)
        # Everything imported and loaded so far (torch, transformers' tokenizer, numpy, TVM:
        # hundreds of thousands of objects) moves to the permanent generation, so the cyclic
        # collector's full passes during serving walk only what serving allocates (perf: a decode
        # loop spent 1.5-3.8% of its cycles in gc_collect_main without this).
        gc.freeze()
        return engine

    # --- requests -----------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError for a prompt this engine cannot serve (empty, too long, bad ids)."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model holds at most "
                             f"{self.max_model_len} tokens (prompt + output), so the prompt may have at most "
                             f"{self.max_model_len - 1}; shorten it")
        self.check_token_ids(prompt_ids)

    def check_token_ids(self, ids: Sequence[int]) -> None:
        """Raise ValueError when a token id is outside the vocabulary (no-op when it is unknown)."""
        if self.vocab_size and len(ids):
            lo, hi = int(min(ids)), int(max(ids))
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}): {lo}..{hi}")

    @property
    def grammars(self) -> Grammars:
        """llguidance over this model's tokenizer, for requests with a grammar (structured output)."""
        if self._grammars is None:
            raise ValueError("structured output needs the artifact's tokenizer, and this artifact has none")
        return self._grammars

    def check_grammar(self, grammar: str) -> None:
        """Raise ValueError (a GrammarError) naming the problem when ``grammar`` cannot constrain
        this model's output."""
        self.grammars.check(grammar)

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: Optional[str] = None) -> Request:
        self.check_prompt(prompt_ids)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if params.prompt_logprobs is not None and self.num_state_slots:
            raise ValueError("prompt logprobs need a model whose every layer is attention; this one keeps "
                             "recurrent state")
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        req = Request(rid, [int(t) for t in prompt_ids], params)
        req.matcher = matcher
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(req.prompt_ids)
        self.requests[rid] = req
        if self.tokenizer is not None:
            self._texts[rid] = IncrementalText(self.tokenizer, params.stop, params.skip_special_tokens)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request now and free its blocks (a client went away)."""
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return None
        return self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- one iteration ------------------------------------------------------------------------
    def build_batch(self, chunks: list[tuple[Request, int]]) -> tuple[StepBatch, list[range]]:
        """The step's inputs, and each chunk's logits rows (one, or one per token). A chunk of a request that scores
        its prompt (``prompt_logprobs``) or checks a draft becomes one single-token sequence per position, all on
        the request's block table: every layer writes the whole step's K/V before attending, so
        each position sees those before it, as in a prefill, and gets a logits row of its own."""
        bs = self.executor.block_size
        ids, positions, slots, tables, lens, counts, chunk_rows = [], [], [], [], [], [], []
        for req, n in chunks:
            start = req.num_computed
            table = np.asarray(req.blocks.table, dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)
            ids.append(np.asarray(req.tokens[start:start + n], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            first = len(counts)
            if req.draft or (req.prompt_logprobs is not None and start < len(req.prompt_ids) - 1):
                lens.extend(range(start + 1, start + n + 1))
                tables.extend([table] * n)
                counts.extend([1] * n)
            else:
                lens.append(start + n)
                tables.append(table)
                counts.append(n)
            chunk_rows.append(range(first, len(counts)))
        table_array = np.zeros((len(tables), max(t.size for t in tables)), dtype=np.int64)
        for b, table in enumerate(tables):
            table_array[b, :table.size] = table
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        state = np.asarray([self._state_slot(req) for req, _ in chunks], dtype=np.int64) \
            if self.num_state_slots else None
        batch = StepBatch(np.concatenate(ids), np.concatenate(positions), np.concatenate(slots), table_array,
                          np.asarray(lens, dtype=np.int64), query_start, query_start[1:] - 1, state)
        return batch, chunk_rows

    def _state_slot(self, req: Request) -> int:
        slot = self._slot_of.get(req.request_id)
        if slot is None:
            if not self._free_slots:
                raise RuntimeError("no free recurrent state slot (more running sequences than slots)")
            slot = self._slot_of[req.request_id] = self._free_slots.pop()
        return slot

    def _release_slot(self, req: Request) -> None:
        slot = self._slot_of.pop(req.request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def iterate(self) -> list[RequestOutput]:
        """Run one scheduled step; returns what each request that moved gained."""
        drafted = self._draft() if self.speculative_tokens else []
        sched = self.scheduler.schedule()
        if drafted:
            self._fit_drafts(drafted, sched.chunks)
        if not sched.chunks:
            return []
        for victim in sched.preempted:  # recomputed from its first token later: a fresh slot then
            self._release_slot(victim)
        self.blocks.run_copies(self._copy_blocks)  # partly filled blocks shared before the step writes them
        batch, chunk_rows = self.build_batch(sched.chunks)
        logits = self.executor.step(batch)
        self.steps += 1
        ready, rows, checked = [], [], []
        for (req, n), span in zip(sched.chunks, chunk_rows):
            if req.draft:
                checked.append((req, logits[span.start:span.stop]))
                continue
            if req.prompt_logprobs is not None and len(span) == n:  # a row per position: score them
                self._score_prompt(req, logits[span.start:span.stop])
            req.num_computed += n
            self.blocks.register(req.blocks, req.tokens, req.num_computed)
            if req.num_pending == 0:
                ready.append(req)
                rows.append(span.stop - 1)
        outputs = [self._check_draft(req, rows_of, time.monotonic()) for req, rows_of in checked]
        if any(req.params.max_tokens == 0 for req in ready):  # prompt scored, nothing to generate
            for req in [r for r in ready if r.params.max_tokens == 0]:
                out = self._finish(req, "length")
                out.prompt_logprobs = req.prompt_logprobs
                outputs.append(out)
            rows = [row for row, req in zip(rows, ready) if req.params.max_tokens]
            ready = [req for req in ready if req.params.max_tokens]
        if not ready:
            return outputs
        if len(rows) < len(logits):  # (a decode-only step samples every row: no 1.5 MB copy)
            logits = logits[rows]
        guided = [j for j, req in enumerate(ready) if req.matcher is not None]
        if guided:  # structured output: tokens outside each request's grammar get -inf
            if not logits.flags.writeable:
                logits = np.array(logits)
            for j in guided:
                ready[j].matcher.mask(logits[j])
        samples = sample_batch([r.sampler for r in ready], logits, [r.tokens for r in ready],
                               [r.output_ids for r in ready])
        now = time.monotonic()
        for req, sample in zip(ready, samples):
            outputs.append(self._accept(req, sample, now))
        return outputs

    # --- speculative decoding -------------------------------------------------------------------
    def _draft(self) -> list[Request]:
        """Guess the next tokens of each running greedy request (appended to its tokens for
        this step); the requests that got a guess."""
        running = self.scheduler.running
        if not running or len(running) > self.speculative_max_seqs:
            return []
        drafted = []
        for req in running:
            p = req.params
            if (req.num_pending != 1 or not p.greedy or p.penalized or req.matcher is not None
                    or req.prompt_logprobs is not None):
                continue
            if req.guess_wait:
                req.guess_wait -= 1
                continue
            room = min(p.max_tokens - len(req.output_ids), self.max_model_len - req.num_tokens) - 1
            draft = propose(req.tokens, min(req.guess_len or self.speculative_tokens, room))
            if draft:
                req.draft = draft
                req.tokens.extend(draft)
                drafted.append(req)
        return drafted

    @staticmethod
    def _fit_drafts(drafted: list[Request], chunks: list[tuple[Request, int]]) -> None:
        """Drop the guessed tokens the scheduler did not give room (the token budget, or a
        preemption that sent the request back to the queue)."""
        scheduled = {id(req): n for req, n in chunks}
        for req in drafted:
            keep = max(scheduled.get(id(req), 1) - 1, 0)
            if len(req.draft) > keep:
                del req.tokens[len(req.tokens) - (len(req.draft) - keep):]
                req.draft = req.draft[:keep]

    def _check_draft(self, req: Request, rows: np.ndarray, now: float) -> RequestOutput:
        """Keep the longest prefix of the guess that greedy decoding gives (row j is the
        prediction after position j of the step) and the token the first mismatch predicts."""
        draft, req.draft = req.draft, []
        del req.tokens[len(req.tokens) - len(draft):]
        predicted = np.argmax(rows, axis=1).tolist()
        m = 0
        while m < len(draft) and predicted[m] == draft[m]:
            m += 1
        self.draft_tokens += len(draft)
        self.accepted_tokens += m
        req.guess_len, req.guess_misses, req.guess_wait = next_guess(self.speculative_tokens, len(draft), m,
                                                                     req.guess_misses)
        req.num_computed += 1 + m  # the last real token and the accepted guesses are in the cache
        kept = draft[:m] + [predicted[m]]
        # greedy without penalties: the logprobs are the raw rows' (as the sampler's would be)
        samples = scored_tokens(rows[:m + 1], kept, req.params.logprobs) if req.params.logprobs is not None \
            else [Sample(int(token)) for token in kept]
        out = None
        for sample in samples:
            step = self._accept(req, sample, now)
            if out is None:
                out = step
            else:  # one output a step: the tokens and their text together
                out.new_samples += step.new_samples
                out.text += step.text
                out.finished, out.finish_reason = step.finished, step.finish_reason
                out.completion_tokens = step.completion_tokens
            if step.finished:
                break
        if not out.finished:
            self.blocks.register(req.blocks, req.tokens, req.num_computed)
        return out

    def _score_prompt(self, req: Request, rows: np.ndarray) -> None:
        """Record the prompt tokens that the logits ``rows`` (one per position of this chunk,
        from num_computed on) predict: row j scores the token at position num_computed + j + 1."""
        first = req.num_computed + 1
        count = min(len(rows), len(req.prompt_ids) - first)
        if count > 0:
            scored = scored_tokens(rows[:count], req.prompt_ids[first:first + count], req.params.prompt_logprobs)
            req.prompt_logprobs[first:first + count] = scored

    def _accept(self, req: Request, sample: Sample, now: float) -> RequestOutput:
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.first_token(now - req.arrival)
            self.prompt_tokens += len(req.prompt_ids)
        else:
            self.metrics.inter_token(now - req.last_token_time)
        req.last_token_time = now
        req.append(sample)
        self.generation_tokens += 1
        out = RequestOutput(req.request_id, [sample])
        if len(req.output_ids) == 1:
            out.prompt_logprobs = req.prompt_logprobs
        p = req.params
        token = sample.token
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        else:
            text = self._texts.get(req.request_id)
            if text is not None:
                out.text = text.push(token)
                if text.stopped is not None:
                    reason = "stop"
        if reason is None and req.matcher is not None and req.matcher.accept(token):
            reason = "stop"  # the grammar is complete: only an end-of-sequence token could follow
        if reason is None and len(req.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is None and req.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            done = self._finish(req, reason)
            out.text += done.text
            out.finished, out.finish_reason = True, reason
        self._fill_usage(req, out)
        return out

    def _fill_usage(self, req: Request, out: RequestOutput) -> None:
        out.prompt_tokens = len(req.prompt_ids)
        out.completion_tokens = len(req.output_ids)
        out.cached_tokens = req.num_cached_prompt

    def _finish(self, req: Request, reason: str) -> RequestOutput:
        self.scheduler.finish(req, reason)
        self._release_slot(req)
        self.requests.pop(req.request_id, None)
        text = self._texts.pop(req.request_id, None)
        out = RequestOutput(req.request_id, text=text.finish() if text is not None else "", finished=True,
                            finish_reason=reason)
        self._fill_usage(req, out)
        self.metrics.finished(req)
        return out

    # --- synchronous use (llmc run, tests) ----------------------------------------------------
    def run_to_completion(self) -> None:
        while self.has_unfinished():
            self.iterate()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Run one request to its end, yielding its outputs; ``self.stats`` says how it went."""
        req = self.add_request(prompt_ids, params)
        self.stats = stats = GenerationStats(prompt_tokens=len(req.prompt_ids))
        t0 = time.perf_counter()
        t_first = None
        try:
            while True:
                for out in self.iterate():
                    if out.request_id != req.request_id:
                        continue
                    if t_first is None:
                        t_first = time.perf_counter()
                        stats.prefill_seconds = t_first - t0
                    yield out
                    if out.finished:
                        stats.generated_tokens = out.completion_tokens
                        stats.stop_reason = out.finish_reason or ""
                        stats.decode_seconds = time.perf_counter() - t_first
                        return
        finally:
            self.abort(req.request_id)

    # --- the single-sequence interface --------------------------------------------------------
    def reset(self) -> None:
        """Forget the direct sequence: the next ``step`` starts at position 0."""
        self.blocks.free(self._direct)
        self.position = 0

    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the direct sequence and return the logits [vocab] of the last one
        (bypasses the scheduler; for tests and kernel benchmarks)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("step needs at least one token")
        self.check_token_ids(ids)
        end = self.position + ids.size
        if end > self.max_model_len:
            raise ValueError(f"the sequence would be {end} tokens, over this artifact's limit of "
                             f"{self.max_model_len}; shorten the prompt or recompile with a larger --max-seq-len")
        if not self.blocks.allocate(self._direct, end):
            raise RuntimeError("no free KV blocks for the direct sequence")
        bs = self.executor.block_size
        table = np.asarray(self._direct.table, dtype=np.int64)
        positions = np.arange(self.position, end, dtype=np.int64)
        batch = StepBatch(ids, positions, table[positions // bs] * bs + positions % bs, table[None, :],
                          np.array([end]), np.array([0, ids.size]), np.array([ids.size - 1]),
                          np.array([self.num_state_slots - 1]) if self.num_state_slots else None)
        logits = self.executor.step(batch)
        self.position = end
        return np.array(logits[0])  # a copy: the executor may return a view of its output


__all__ = ["ArtifactError", "Engine", "EngineMetrics", "GenerationStats", "RequestOutput"]
