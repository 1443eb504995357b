#!/usr/bin/env python3
"""Where a serving step's time goes, in-process: the load of benchmarks/serve.py (N concurrent
greedy requests over its fixed prompts) driven straight through the Engine, with every kernel
the Relax VM calls timed (``VirtualMachine.set_instrument``) and the steps split by kind
(decode-only steps by sequence count, and mixed steps holding prompt chunks).

    python benchmarks/step_profile.py out/smollm2-q41 --clients 8 --requests 16 --max-tokens 32

Several artifacts load into one process (one thread pool) and serve the same requests in
lockstep, one engine iteration of each in turn (A B A B ...), so load on a busy machine hits
every side alike; ``--rounds N`` repeats the measured load. Per-step medians of the step and of
``paged_attention`` follow each artifact's totals.

``--warm`` first runs the same requests once, so the measured round starts from cached
prompts the way serve.py's 8-client run follows its 1-client run. The instrument callback
adds a few microseconds per kernel call; the "python" line is the engine's own time
(scheduling, batch building, sampling, detokenizing) outside the executor.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import prompts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", metavar="artifact")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="run the requests once before measuring")
    ap.add_argument("--rounds", type=int, default=1, help="times the measured load runs")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per step kind")
    ap.add_argument("--steps-only", action="store_true",
                    help="time whole steps only, without the per-kernel instrument (whose few microseconds "
                         "per VM call inflate a step by ~1/3): the figures to compare artifacts by")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time kernels and steps by the main thread's CPU clock (time.thread_time); with "
                         "--threads 1 all kernel work runs on that thread, so other processes on a busy "
                         "machine do not inflate the figures (the instrument's own Python calls still do)")
    args = ap.parse_args(argv)
    from llmc.runtime import Engine

    sides = [Side(Engine.load(a, threads=args.threads, without_torch=True), args) for a in args.artifacts]
    if args.warm:
        lockstep(sides)
    for side in sides:
        side.instrument()
    for _ in range(args.rounds):
        wall, tokens = lockstep(sides)
        for side, w, t in zip(sides, wall, tokens):
            side.wall += w
            side.tokens += t
    for name, side in zip(args.artifacts, sides):
        if len(sides) > 1:
            print(f"== {name}")
        side.report(args.top)
    return 0


def lockstep(sides) -> tuple[list, list]:
    """Serve each side's requests, one engine iteration of each side in turn (A B A B ...), so
    load on a busy machine hits every side alike, step by step. Returns each side's seconds
    inside its own iterations and its output tokens."""
    for side in sides:
        side.start()
    wall, tokens = [0.0] * len(sides), [0] * len(sides)
    while any(side.eng.has_unfinished() for side in sides):
        for i, side in enumerate(sides):
            if side.eng.has_unfinished():
                t0 = time.perf_counter()
                tokens[i] += side.iterate()
                wall[i] += time.perf_counter() - t0
    return wall, tokens


def attention_seconds(kernels: dict) -> float:
    """Time in the paged_attention kernels (prefill and decode entry points name theirs apart)."""
    return sum(seconds for name, seconds in kernels.items() if name.startswith("paged_attention"))


class Side:
    """One artifact's engine, its requests, and the kernel times of its measured rounds."""

    def __init__(self, eng, args):
        self.eng, self.args = eng, args
        self.todo = [eng.tokenizer.encode(p) for p in prompts()]
        self.per_call: dict = collections.defaultdict(float)
        self.started = [0.0]
        self.kernels: dict = collections.defaultdict(lambda: collections.defaultdict(float))
        self.steps: collections.Counter = collections.Counter()
        self.samples: dict = collections.defaultdict(list)  # kind -> (step seconds, attention seconds) per step
        self.wall = self.tokens = 0.0

    def instrument(self):
        ex, per_call, started = self.eng.executor, self.per_call, self.started
        clock = time.thread_time if self.args.cpu_clock else time.perf_counter

        def callback(func, name, before, ret, *rest):
            if before:
                started[0] = clock()
            else:
                per_call[name] += clock() - started[0]

        run_step = ex.step

        def timed_step(batch):
            per_call.clear()
            t0 = clock()
            out = run_step(batch)
            kind = f"decode x{batch.num_seqs}" if batch.num_tokens == batch.num_seqs else "mixed"
            self.steps[kind] += 1
            self.kernels[kind]["(step)"] += clock() - t0
            for name, seconds in per_call.items():
                self.kernels[kind][name] += seconds
            self.samples[kind].append((clock() - t0, attention_seconds(per_call)))
            return out

        if not self.args.steps_only:
            ex.vm.set_instrument(callback)
        ex.step = timed_step

    def start(self):
        self.issued = 0
        while self.issued < min(self.args.clients, self.args.requests):
            self.add()

    def add(self):
        from llmc.runtime.sampler import SamplingParams

        self.eng.add_request(self.todo[self.issued % len(self.todo)],
                             SamplingParams(max_tokens=self.args.max_tokens, ignore_eos=True))
        self.issued += 1

    def iterate(self) -> int:
        """One engine iteration; returns the tokens it produced (finished requests are replaced)."""
        tokens = 0
        for out in self.eng.iterate():
            tokens += len(out.new_samples)
            if out.finished and self.issued < self.args.requests:
                self.add()
        return tokens

    def report(self, top: int):
        wall, tokens, kernels, steps = self.wall, self.tokens, self.kernels, self.steps
        in_steps = sum(k["(step)"] for k in kernels.values())
        print(f"{tokens:.0f} output tokens in {wall:.2f} s ({tokens / wall:.1f} tok/s); executor {in_steps:.2f} s, "
              f"python {wall - in_steps:.2f} s ({100 * (wall - in_steps) / wall:.1f}%)")
        for kind in sorted(kernels, key=lambda k: -kernels[k]["(step)"]):
            d, n = kernels[kind], steps[kind]
            print(f"{kind}: {n} steps, {1e3 * d['(step)'] / n:.1f} ms each, {100 * d['(step)'] / wall:.0f}% of the wall time")
            for name, seconds in sorted(d.items(), key=lambda kv: -kv[1])[1:top + 1]:
                print(f"  {1e3 * seconds / n:8.2f} ms {100 * seconds / d['(step)']:5.1f}%  {name}")
        for kind in sorted(self.samples):  # medians: robust to a busy machine's bursts
            steps_ms = sorted(1e3 * x[0] for x in self.samples[kind])
            attention_ms = sorted(1e3 * x[1] for x in self.samples[kind])
            m = len(steps_ms) // 2
            print(f"{kind} median of {len(steps_ms)} steps: step {steps_ms[m]:.2f} ms, paged_attention "
                  f"{attention_ms[m]:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
