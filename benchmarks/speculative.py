#!/usr/bin/env python3
"""Single-stream greedy decoding with and without prompt-lookup speculative decoding: llmc
(``speculative_tokens``) beside llama.cpp (llama-cpp-python's ``LlamaPromptLookupDecoding``
draft model) on the same GGUF and threads, each engine in its own process.

    python benchmarks/speculative.py --artifact out/smollm2-cpu [--tokens 4] [--max-tokens 96]

Prompts: serve.py's fixed set (a model that drifts into repeating itself) and three that
quote their input (a summary, a JSON rewrite, code). Per prompt and engine, plain and
speculative runs alternate for ``--rounds``; the table gives decode tokens/s (tokens after
the first over the time after the first), medians over rounds, summed over prompts, and llmc
checks that both modes produce the same tokens. JSON goes to ``--out``.
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
sys.path.insert(0, HERE)

QUOTING = [
    "Summarize this text: The quick brown fox jumps over the lazy dog. The dog was not amused and the fox ran "
    "away into the forest. Summary:",
    "Rewrite the following JSON with the key 'name' renamed to 'title': {\"name\": \"Alpha\", \"id\": 1, "
    "\"tags\": [\"a\", \"b\"]}\nAnswer:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "# the same function with memoization:\n",
]


def all_prompts() -> list[tuple[str, str]]:
    from serve import prompts

    return [("serve", p) for p in prompts()[:6]] + [("quoting", p) for p in QUOTING]


def llmc_worker(args) -> dict:
    from llmc.runtime import Engine, SamplingParams

    engine = Engine.load(args.artifact, threads=args.threads, without_torch=True, max_num_seqs=1)
    tok = engine.tokenizer
    out = []
    for kind, prompt in all_prompts():
        ids = tok.encode(prompt)
        runs = {"plain": [], "speculative": []}
        tokens = {}
        for _ in range(args.rounds):
            for mode, k in (("plain", 0), ("speculative", args.tokens)):
                engine.speculative_tokens = k
                steps0, drafts0, held0 = engine.steps, engine.draft_tokens, engine.accepted_tokens
                got = []
                for o in engine.generate(ids, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)):
                    got += o.new_token_ids
                s = engine.stats
                runs[mode].append({"tok_s": (s.generated_tokens - 1) / s.decode_seconds, "steps": engine.steps - steps0,
                                   "guessed": engine.draft_tokens - drafts0, "held": engine.accepted_tokens - held0})
                tokens.setdefault(mode, got)
        out.append({"kind": kind, "prompt": prompt[:48], "same_tokens": tokens["plain"] == tokens["speculative"],
                    **{m: summarize(r) for m, r in runs.items()}})
    return {"engine": "llmc", "results": out}


def llama_worker(args) -> dict:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def load(draft):
        return llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                               n_ctx=2048, verbose=False, draft_model=draft)

    models = {"plain": load(None), "speculative": load(LlamaPromptLookupDecoding(num_pred_tokens=args.tokens))}
    out = []
    for kind, prompt in all_prompts():
        runs = {"plain": [], "speculative": []}
        for _ in range(args.rounds):
            for mode, llm in models.items():
                llm.reset()
                t0, first, n = time.perf_counter(), None, 0
                no_eos = {llm.token_eos(): -100.0}  # as llmc's ignore_eos: every run makes max_tokens tokens
                for _chunk in llm.create_completion(prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True,
                                                    logit_bias=no_eos):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
                end = time.perf_counter()
                runs[mode].append({"tok_s": (n - 1) / max(end - first, 1e-9), "prefill_s": first - t0})
        out.append({"kind": kind, "prompt": prompt[:48], **{m: summarize(r) for m, r in runs.items()}})
    return {"engine": "llama.cpp", "results": out}


def summarize(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def table(reports: list[dict]) -> list[str]:
    lines = ["| engine | prompts | plain tok/s | speculative tok/s | speedup |", "| --- | --- | --- | --- | --- |"]
    for rep in reports:
        for kind in ("serve", "quoting"):
            rows = [r for r in rep["results"] if r["kind"] == kind]
            plain = statistics.median(r["plain"]["tok_s"] for r in rows)
            spec = statistics.median(r["speculative"]["tok_s"] for r in rows)
            lines.append(f"| {rep['engine']} | {kind} ({len(rows)}) | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}x |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--gguf", help="the GGUF llama.cpp runs (default: the bundled SmolLM2)")
    ap.add_argument("--tokens", type=int, default=4, help="guessed tokens a step (both engines)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="llmc,llama.cpp")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "speculative.json"))
    ap.add_argument("--worker", choices=("llmc", "llama.cpp"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(llmc_worker(args) if args.worker == "llmc" else llama_worker(args)))
        return 0
    if args.gguf is None:
        from serve import bundled_gguf

        args.gguf = bundled_gguf()
    reports = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--artifact", args.artifact,
               "--gguf", args.gguf, "--tokens", str(args.tokens), "--max-tokens", str(args.max_tokens),
               "--threads", str(args.threads), "--rounds", str(args.rounds)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)  # its own process: OpenMP at its best
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = table(reports)
    print("\n".join(lines))
    for rep in reports:
        if rep["engine"] == "llmc":
            same = all(r["same_tokens"] for r in rep["results"])
            print(f"llmc: speculative tokens equal plain greedy on every prompt: {same}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "reports": reports,
                   "table": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
