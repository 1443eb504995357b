#!/usr/bin/env python3
"""A/B: the same single-sequence prefill and decode, measured on two llmc builds in one run.

Each side is a Python interpreter that imports its own llmc (a checkout's virtualenv, e.g. a
`git worktree` of the commit before a change) plus an artifact that build compiled. Both load
once in their own process, then take turns, task by task, for every repetition, so machine
noise hits both alike; the table shows medians and B/A ratios (> 1: B faster).

    git worktree add --detach ../llmc-before HEAD~3
    (cd ../llmc-before && python3 -m venv --system-site-packages .venv &&
     .venv/bin/pip install --no-deps -e . && .venv/bin/llmc compile smollm2 -o out/smollm2-cpu)
    python benchmarks/ab.py --a ../llmc-before/.venv/bin/python:../llmc-before/out/smollm2-cpu \\
                            --b python3:out/smollm2-cpu

The prompt is the fixed text of benchmarks/cpu.py, tokenized by the artifact's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs inside each side's interpreter: load, then answer "prefill N" / "decode P M" lines
# with the seconds the timed part took (one JSON line each).
WORKER = r"""
import json, sys, time
import numpy as np
from llmc.runtime import Engine
artifact, threads, text = sys.argv[1], int(sys.argv[2]), sys.stdin.readline()
eng = Engine.load(artifact, threads=threads)
ids = eng.tokenizer.encode(json.loads(text))
while len(ids) < 4096:
    ids = ids + ids
ids = np.asarray(ids, dtype=np.int64)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    kind, *nums = line.split()
    if kind == "prefill":
        eng.reset()
        t0 = time.perf_counter(); eng.step(ids[: int(nums[0])]); dt = time.perf_counter() - t0
        print(json.dumps({"seconds": dt}), flush=True)
    elif kind == "decode":
        eng.reset()
        tok = int(np.argmax(eng.step(ids[: int(nums[0])])))
        t0 = time.perf_counter()
        for _ in range(int(nums[1])):
            tok = int(np.argmax(eng.step(np.array([tok], dtype=np.int64))))
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
"""


class Side:
    def __init__(self, label: str, spec: str, threads: int, text: str):
        python, _, artifact = spec.partition(":")
        if not artifact:
            raise SystemExit(f"--{label.lower()} takes PYTHON:ARTIFACT, got {spec!r}")
        self.label, self.spec = label, spec
        self.proc = subprocess.Popen([python, "-c", WORKER, artifact, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(text) + "\n")
        self.proc.stdin.flush()
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"side {self.label} ({self.spec}) exited: see its error above")
        return json.loads(line)

    def ask(self, command: str) -> float:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, metavar="PYTHON:ARTIFACT", help="the baseline")
    p.add_argument("--b", required=True, metavar="PYTHON:ARTIFACT", help="the change")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--decode", type=int, default=128, help="decode steps after a 128-token prompt")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from cpu import PROMPT_TEXT  # the same text as the main benchmark

    sides = [Side("A", args.a, args.threads, PROMPT_TEXT), Side("B", args.b, args.threads, PROMPT_TEXT)]
    tasks = [(f"prefill-{n}", f"prefill {n}", n) for n in args.prefill]
    tasks.append((f"decode-{args.decode}", f"decode 128 {args.decode}", args.decode))
    for side in sides:  # warm-up
        for _, cmd, _ in tasks:
            side.ask(cmd)
    rates = {s.label: {name: [] for name, _, _ in tasks} for s in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, cmd, tokens in tasks:
            for side in order:
                rates[side.label][name].append(tokens / side.ask(cmd))
        print(f"round {r + 1}: " + ", ".join(f"{name} A {rates['A'][name][-1]:.1f} B {rates['B'][name][-1]:.1f}"
                                             for name, _, _ in tasks), flush=True)
    print(f"\n{'tok/s (median)':16s} {'A':>9s} {'B':>9s} {'B/A':>6s}")
    summary = {}
    for name, _, _ in tasks:
        a, b = statistics.median(rates["A"][name]), statistics.median(rates["B"][name])
        summary[name] = {"a": a, "b": b, "ratio": b / a}
        print(f"{name:16s} {a:9.1f} {b:9.1f} {b / a:6.3f}")
    print(f"A = {args.a}\nB = {args.b}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, "threads": args.threads, "repeats": args.repeats,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "rates": rates, "summary": summary}, f, indent=1)
    for s in sides:
        s.proc.stdin.close()
        s.proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
