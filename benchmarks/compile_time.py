#!/usr/bin/env python3
"""Compile time: `llmc compile MODEL --target cpu` cold (empty cache) and warm (cache filled).

Each compile is a fresh `python -m llmc.cli compile ... --verbose` process timed by wall
clock, so interpreter start-up and imports count, as they do for a user. The cold run uses a
new, empty LLMC_CACHE_DIR (no GGUF conversion, no compiled kernels); the warm runs reuse it.
The per-stage times come from the compiler's own "stage timings" line.

    python benchmarks/compile_time.py                      # smollm2, 1 cold + 3 warm compiles
    python benchmarks/compile_time.py --model DIR_OR_GGUF --warm 5
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import machine, print_table, versions  # noqa: E402  (same machine/version facts as cpu.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = re.compile(r"stage timings: (.*)")


def compile_once(model: str, target: str, out: str, cache: str, extra: list[str]) -> dict:
    env = dict(os.environ, LLMC_CACHE_DIR=cache)
    env.pop("LLMC_NO_CACHE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", model, "--target", target, "-o", out,
                           "--verbose", *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"llmc compile failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    stages = {}
    match = STAGES.search(proc.stderr)
    if match:
        for part in match.group(1).split(", "):
            name, seconds = part.rsplit(" ", 1)
            stages[name] = float(seconds.rstrip("s"))
    hits = {"conversion_cache_hit": "converted GGUF in" not in proc.stderr,
            "kernel_cache_hit": "kernel cache hit" in proc.stderr}
    return {"wall_s": round(wall, 2), "stages_s": stages, **hits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--target", default="cpu")
    p.add_argument("--warm", type=int, default=3, help="warm compiles after the cold one (default 3)")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "compile_time.json"))
    p.add_argument("compile_args", nargs="*", help="extra `llmc compile` arguments (after --)")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="llmc-compile-bench-")
    try:
        cache = os.path.join(work, "cache")
        runs = [dict(kind="cold", **compile_once(args.model, args.target, os.path.join(work, "cold"), cache,
                                                 args.compile_args))]
        for i in range(args.warm):
            runs.append(dict(kind="warm", **compile_once(args.model, args.target, os.path.join(work, f"warm{i}"),
                                                         cache, args.compile_args)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stage_names = list(dict.fromkeys(name for r in runs for name in r["stages_s"]))
    rows = [[r["kind"], f"{r['wall_s']:.1f}", *(f"{r['stages_s'].get(n, 0):.1f}" for n in stage_names),
             "yes" if r["conversion_cache_hit"] else "no", "yes" if r["kernel_cache_hit"] else "no"] for r in runs]
    print(f"llmc compile {args.model} --target {args.target}: wall seconds per fresh process")
    print_table(rows, ["run", "wall", *stage_names, "conv hit", "kernel hit"])
    warm = [r["wall_s"] for r in runs if r["kind"] == "warm"]
    summary = {"cold_wall_s": runs[0]["wall_s"], "warm_wall_s_median": statistics.median(warm) if warm else None}
    print(f"cold {summary['cold_wall_s']:.1f}s, warm median {summary['warm_wall_s_median'] or float('nan'):.1f}s")
    result = {"benchmark": "compile_time", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": args.model, "target": args.target, "machine": machine(None), "versions": versions(),
              "runs": runs, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
