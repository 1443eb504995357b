#!/usr/bin/env python3
"""Per-kernel profile of a cpu artifact's decode and prefill steps.

The Relax VM calls an instrument before and after every call instruction; timing between
the two gives each kernel's own time (the callback's Python cost falls outside the timed
interval). Kernels with the same symbol are summed, so the table shows where a step's time
goes and how many kernel calls it makes (the fixed cost per call matters at decode).

    python benchmarks/kernel_profile.py ARTIFACT [--prefill 512] [--decode-after 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict


def profile_step(engine, token_ids, repeats: int = 3) -> dict:
    """Run ``engine.step(token_ids)`` ``repeats`` times with the VM instrumented; returns
    {"wall_s": median step wall time, "kernels": {symbol: {"calls", "seconds"}} per step}."""
    executor = engine.executor
    vm = executor.vm
    totals: dict = defaultdict(lambda: [0, 0.0])
    start = {}

    def instrument(func, symbol, before, ret, *args):
        if before:
            start[symbol] = time.perf_counter()
        else:
            t = time.perf_counter() - start.pop(symbol, time.perf_counter())
            entry = totals[str(symbol)]
            entry[0] += 1
            entry[1] += t
        return 0  # VMInstrumentReturnKind.kNoOp: run the call normally

    walls = []
    position = engine.position
    vm.set_instrument(instrument)
    try:
        for _ in range(repeats):
            _rewind(engine, position)
            t0 = time.perf_counter()
            engine.step(token_ids)
            walls.append(time.perf_counter() - t0)
    finally:
        _clear_instrument(vm)
    kernels = {name: {"calls": c // repeats, "seconds": s / repeats} for name, (c, s) in totals.items()}
    walls.sort()
    return {"wall_s": walls[len(walls) // 2], "kernels": kernels}


def _clear_instrument(vm) -> None:
    try:
        vm.set_instrument(None)
    except Exception:  # a TVM that wants a function: a no-op one then
        vm.set_instrument(lambda *a: 0)


def _rewind(engine, position: int) -> None:
    """Put the engine's direct sequence back at ``position`` (its KV blocks stay allocated)."""
    engine.position = position


def uninstrumented_step(engine, token_ids, repeats: int = 3) -> float:
    """Median wall time of the same step without the instrument (what a user sees)."""
    walls = []
    position = engine.position
    for _ in range(repeats):
        _rewind(engine, position)
        t0 = time.perf_counter()
        engine.step(token_ids)
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return walls[len(walls) // 2]


def profile_artifact(artifact: str, prompt_ids: list[int], prefill: int, decode_after: int,
                     threads: int, repeats: int = 3) -> dict:
    """Profiles of a ``prefill``-token prefill and of a decode step after ``decode_after`` tokens."""
    from llmc.runtime import Engine

    eng = Engine.load(artifact, threads=threads)
    out = {}
    eng.reset()
    eng.step(prompt_ids[:8])  # warm-up
    eng.reset()
    out[f"prefill-{prefill}"] = profile_step(eng, prompt_ids[:prefill], repeats)
    eng.reset()
    out[f"prefill-{prefill}"]["plain_wall_s"] = uninstrumented_step(eng, prompt_ids[:prefill], repeats)
    eng.reset()
    eng.step(prompt_ids[:decode_after])
    tok = [prompt_ids[decode_after]]
    out[f"decode-after-{decode_after}"] = profile_step(eng, tok, max(repeats, 10))
    out[f"decode-after-{decode_after}"]["plain_wall_s"] = uninstrumented_step(eng, tok, max(repeats, 10))
    return out


def format_profile(name: str, prof: dict, top: int = 15) -> str:
    kernels = sorted(prof["kernels"].items(), key=lambda kv: -kv[1]["seconds"])
    total = sum(k["seconds"] for _, k in kernels)
    calls = sum(k["calls"] for _, k in kernels)
    lines = [f"{name}: step {prof.get('plain_wall_s', prof['wall_s']) * 1e3:.2f} ms uninstrumented, "
             f"{prof['wall_s'] * 1e3:.2f} ms instrumented; {calls} calls, kernels {total * 1e3:.2f} ms",
             f"  {'kernel':<44} {'calls':>5} {'ms':>8} {'%':>6} {'us/call':>8}"]
    for sym, k in kernels[:top]:
        lines.append(f"  {sym[:44]:<44} {k['calls']:>5} {k['seconds'] * 1e3:>8.3f} "
                     f"{100 * k['seconds'] / total if total else 0:>6.1f} "
                     f"{1e6 * k['seconds'] / max(1, k['calls']):>8.1f}")
    rest = kernels[top:]
    if rest:
        lines.append(f"  {'(' + str(len(rest)) + ' others)':<44} {sum(k['calls'] for _, k in rest):>5} "
                     f"{sum(k['seconds'] for _, k in rest) * 1e3:>8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode-after", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(100, 20000, max(args.prefill, args.decode_after) + 1)]
    prof = profile_artifact(args.artifact, ids, args.prefill, args.decode_after, args.threads, args.repeats)
    for name, entry in prof.items():
        print(format_profile(name, entry, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(prof, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
