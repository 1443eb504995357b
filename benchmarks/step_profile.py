#!/usr/bin/env python3
"""Where a serving step's time goes, in-process: the load of benchmarks/serve.py (N concurrent
greedy requests over its fixed prompts) driven straight through the Engine, with every kernel
the Relax VM calls timed (``VirtualMachine.set_instrument``) and the steps split by kind
(decode-only steps by sequence count, and mixed steps holding prompt chunks).

    python benchmarks/step_profile.py out/smollm2-q41 --clients 8 --requests 16 --max-tokens 32

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
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="run the requests once before measuring")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per step kind")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time kernels and steps by the main thread's CPU clock (time.thread_time); with "
                         "--threads 1 all kernel work runs on that thread, so other processes on a busy "
                         "machine do not inflate the figures (the wall-time totals still do)")
    args = ap.parse_args(argv)
    clock = time.thread_time if args.cpu_clock else time.perf_counter
    from llmc.runtime import Engine
    from llmc.runtime.sampler import SamplingParams

    eng = Engine.load(args.artifact, threads=args.threads, without_torch=True)
    todo = [eng.tokenizer.encode(p) for p in prompts()]
    ex = eng.executor
    per_call: dict = collections.defaultdict(float)
    started = [0.0]

    def instrument(func, name, before, ret, *rest):
        if before:
            started[0] = clock()
        else:
            per_call[name] += clock() - started[0]

    kernels: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    steps: collections.Counter = collections.Counter()
    run_step = ex.step

    def timed_step(batch):
        per_call.clear()
        t0 = clock()
        out = run_step(batch)
        kind = f"decode x{batch.num_seqs}" if batch.num_tokens == batch.num_seqs else "mixed"
        steps[kind] += 1
        kernels[kind]["(step)"] += clock() - t0
        for name, seconds in per_call.items():
            kernels[kind][name] += seconds
        return out

    def load() -> tuple[float, int]:
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

    if args.warm:
        load()
    ex.vm.set_instrument(instrument)
    ex.step = timed_step
    wall, tokens = load()
    in_steps = sum(k["(step)"] for k in kernels.values())
    print(f"{tokens} output tokens in {wall:.2f} s ({tokens / wall:.1f} tok/s); executor {in_steps:.2f} s, "
          f"python {wall - in_steps:.2f} s ({100 * (wall - in_steps) / wall:.1f}%)")
    for kind in sorted(kernels, key=lambda k: -kernels[k]["(step)"]):
        d, n = kernels[kind], steps[kind]
        print(f"{kind}: {n} steps, {1e3 * d['(step)'] / n:.1f} ms each, {100 * d['(step)'] / wall:.0f}% of the wall time")
        for name, seconds in sorted(d.items(), key=lambda kv: -kv[1])[1:args.top + 1]:
            print(f"  {1e3 * seconds / n:8.2f} ms {100 * seconds / d['(step)']:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
