#!/usr/bin/env python3
"""Where a serving step's time goes, in-process: the load of benchmarks/serve.py (N concurrent
greedy requests over its fixed prompts) driven straight through the Engine, with every kernel
the Relax VM calls timed (``VirtualMachine.set_instrument``) and the steps split by kind
(decode-only steps by sequence count, and mixed steps holding prompt chunks).

    python benchmarks/step_profile.py out/smollm2-q41 --clients 8 --requests 16 --max-tokens 32

Several artifacts load into one process (one thread pool) and their measured rounds alternate
(``--rounds N``: A B A B ...), so load on a busy machine hits every side alike; per-round step
and ``paged_attention`` times and their medians follow each artifact's totals.

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
    ap.add_argument("--rounds", type=int, default=1,
                    help="measured rounds per artifact, interleaved across the artifacts (A B A B ...)")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per step kind")
    args = ap.parse_args(argv)
    from llmc.runtime import Engine

    sides = [Side(Engine.load(a, threads=args.threads, without_torch=True), args) for a in args.artifacts]
    if args.warm:
        for side in sides:
            side.load()
    for side in sides:
        side.instrument()
    for _ in range(args.rounds):
        for side in sides:
            side.round()
    for name, side in zip(args.artifacts, sides):
        if len(sides) > 1:
            print(f"== {name}")
        side.report(args.top)
    return 0


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
        self.rounds: list = []  # per round: (wall, tokens, {kind: (steps, step seconds, attention seconds)})
        self.wall = self.tokens = 0.0

    def instrument(self):
        ex, per_call, started = self.eng.executor, self.per_call, self.started

        def callback(func, name, before, ret, *rest):
            if before:
                started[0] = time.perf_counter()
            else:
                per_call[name] += time.perf_counter() - started[0]

        run_step = ex.step

        def timed_step(batch):
            per_call.clear()
            t0 = time.perf_counter()
            out = run_step(batch)
            kind = f"decode x{batch.num_seqs}" if batch.num_tokens == batch.num_seqs else "mixed"
            self.steps[kind] += 1
            self.kernels[kind]["(step)"] += time.perf_counter() - t0
            for name, seconds in per_call.items():
                self.kernels[kind][name] += seconds
            return out

        ex.vm.set_instrument(callback)
        ex.step = timed_step

    def load(self) -> tuple[float, int]:
        from llmc.runtime.sampler import SamplingParams

        eng, args, todo = self.eng, self.args, self.todo
        issued, tokens = 0, 0

        def add():
            nonlocal issued
            eng.add_request(todo[issued % len(todo)], SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
            issued += 1

        while issued < min(args.clients, args.requests):
            add()
        t0 = time.perf_counter()
        while eng.has_unfinished():
            for out in eng.iterate():
                tokens += len(out.new_samples)
                if out.finished and issued < args.requests:
                    add()
        return time.perf_counter() - t0, tokens

    def round(self):
        before = {k: (self.steps[k], self.kernels[k]["(step)"], attention_seconds(self.kernels[k])) for k in self.kernels}
        wall, tokens = self.load()
        self.wall += wall
        self.tokens += tokens
        kinds = {}
        for k in self.kernels:
            n0, s0, a0 = before.get(k, (0, 0.0, 0.0))
            kinds[k] = (self.steps[k] - n0, self.kernels[k]["(step)"] - s0, attention_seconds(self.kernels[k]) - a0)
        self.rounds.append((wall, tokens, kinds))

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
        if len(self.rounds) > 1:  # per-round figures and their medians (a busy machine varies between rounds)
            per_kind = collections.defaultdict(list)
            for _, _, kinds in self.rounds:
                for kind, (n, step, attention) in kinds.items():
                    if n:
                        per_kind[kind].append((1e3 * step / n, 1e3 * attention / n))
            for kind in sorted(per_kind):
                xs = per_kind[kind]
                steps_ms = sorted(x[0] for x in xs)
                attention_ms = sorted(x[1] for x in xs)
                print(f"{kind} per round: step ms {' '.join(f'{x:.2f}' for x in steps_ms)} (median "
                      f"{steps_ms[len(xs) // 2]:.2f}); paged_attention ms {' '.join(f'{x:.2f}' for x in attention_ms)} "
                      f"(median {attention_ms[len(xs) // 2]:.2f})")


if __name__ == "__main__":
    sys.exit(main())
