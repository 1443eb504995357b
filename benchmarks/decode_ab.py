#!/usr/bin/env python3
"""Decode-step A/B of several cpu artifacts on a busy machine: all loaded in one process (one
thread pool) and stepped alternately, so load hits every side alike.

Each side prefills the same 128 random tokens once, then times ``--steps`` single-token decode
steps at position 128 (rewound each time), interleaved side by side. Reported per artifact: wall
time min / 20th percentile / median and the main thread's CPU time (``time.thread_time``, which
preemption by other processes does not inflate), plus the largest logit difference to the first
artifact (0.0: bit-identical).

    python benchmarks/decode_ab.py out/before out/after --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    args = p.parse_args(argv)
    from llmc.runtime import Engine

    ids = [int(i) for i in np.random.default_rng(0).integers(100, 20000, args.prompt + 1)]
    engines = [Engine.load(a, threads=args.threads) for a in args.artifacts]
    for eng in engines:
        eng.reset()
        eng.step(ids[:args.prompt])
    wall = [[] for _ in engines]
    cpu = [[] for _ in engines]
    last = [None] * len(engines)
    for _ in range(args.steps):
        for i, eng in enumerate(engines):
            eng.position = args.prompt
            c0, t0 = time.thread_time(), time.perf_counter()
            last[i] = eng.step([ids[args.prompt]])
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.thread_time() - c0)
    for name, w, c, logits in zip(args.artifacts, wall, cpu, last):
        w, c = np.sort(w) * 1e3, np.sort(c) * 1e3
        p20 = len(w) // 5
        diff = float(np.abs(logits - last[0]).max())
        print(f"{name}: wall min {w[0]:.2f} p20 {w[p20]:.2f} median {w[len(w) // 2]:.2f} ms; "
              f"main-thread cpu p20 {c[p20]:.2f} median {c[len(c) // 2]:.2f} ms; max |logit diff| {diff:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
