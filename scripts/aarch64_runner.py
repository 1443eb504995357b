"""The AArch64 side of tests/codegen/test_aarch64_qemu.py, run by the emulated python
(scripts/aarch64_qemu.sh): it only executes what the x86-64 host built, and writes the results
back for the host to check (numpy and llmc's runtime only: no torch, no compiler).

    python aarch64_runner.py kernels PLAN.json INPUTS.npz OUT.npz
        PLAN: [{"lib": path.so, "func": name, "args": [array names]}, ...] run in order on one
        table of arrays (seeded from INPUTS; a call's arguments are written back, so outputs
        of one kernel feed the next); OUT gets the whole table.
    python aarch64_runner.py engine ARTIFACT PROMPTS.json OUT.npz
        greedy continuation of each prompt (PROMPTS: {"prompts": [[ids]], "new_tokens": n})
        through llmc.runtime.Engine: OUT gets tokens_i and logits_i (every step's logits).
    python aarch64_runner.py perplexity ARTIFACT IDS.json OUT.json
        llmc.runtime.perplexity over IDS ({"ids": [...], "window": w, "stride": s}); OUT gets
        {"perplexity", "tokens", "seconds"}.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import numpy as np


def _llmc_on_path() -> None:
    """Import llmc from this checkout without installing it: the package maps llmc.runtime and
    llmc.compiler onto the repository's top-level folders (pyproject's package-dir)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    import llmc

    llmc.__path__.append(repo)


def run_kernels(plan_path: str, inputs_path: str, out_path: str) -> None:
    import tvm

    with open(plan_path) as f:
        plan = json.load(f)
    table = {name: tvm.runtime.tensor(array) for name, array in np.load(inputs_path).items()}
    libs = {}
    for call in plan:
        if call["lib"] not in libs:
            libs[call["lib"]] = tvm.runtime.load_module(call["lib"])
        libs[call["lib"]][call["func"]](*[table[name] for name in call["args"]])
    np.savez(out_path, **{name: t.numpy() for name, t in table.items()})


def run_engine(artifact: str, prompts_path: str, out_path: str) -> None:
    _llmc_on_path()
    from llmc.runtime import Engine

    with open(prompts_path) as f:
        spec = json.load(f)
    engine = Engine.load(artifact)
    out = {}
    for i, prompt in enumerate(spec["prompts"]):
        engine.reset()
        logits, tokens, every = engine.step(prompt), [], []
        for _ in range(spec["new_tokens"]):
            every.append(np.asarray(logits, np.float32))
            tokens.append(int(np.argmax(logits)))
            logits = engine.step([tokens[-1]])
        out[f"tokens_{i}"] = np.array(tokens, np.int64)
        out[f"logits_{i}"] = np.stack(every)
    np.savez(out_path, **out)


def run_perplexity(artifact: str, ids_path: str, out_path: str) -> None:
    import time

    _llmc_on_path()
    from llmc.runtime import Engine
    from llmc.runtime.perplexity import all_logits, perplexity

    with open(ids_path) as f:
        spec = json.load(f)
    engine = Engine.load(artifact)
    start = time.perf_counter()
    result = perplexity(spec["ids"], lambda w: all_logits(engine.executor, np.asarray(w)), window=spec["window"],
                        stride=spec["stride"])
    with open(out_path, "w") as f:
        json.dump({"perplexity": result.perplexity, "tokens": len(spec["ids"]),
                   "seconds": time.perf_counter() - start}, f)


def main(argv: list[str]) -> int:
    if platform.machine() != "aarch64":
        print(f"aarch64_runner.py runs on AArch64 (here: {platform.machine()})", file=sys.stderr)
        return 2
    commands = {"kernels": (run_kernels, 3), "engine": (run_engine, 3), "perplexity": (run_perplexity, 3)}
    if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[0]][0](*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
