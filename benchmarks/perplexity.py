#!/usr/bin/env python3
"""Perplexity of llmc artifacts and of transformers on the same text, tokens and windows.

    python benchmarks/perplexity.py --hf smollm2 ARTIFACT [ARTIFACT ...]
    python benchmarks/perplexity.py --hf FILE.gguf --llamacpp FILE.gguf ARTIFACT_OF_FILE

Each artifact is measured through its compiled step (`llmc eval-ppl`'s code path); `--hf
MODEL` adds transformers fp32 on the model llmc imports (for a GGUF: transformers' own
dequantization of the file); `--llamacpp FILE.gguf` adds llama.cpp (llama-cpp-python, its
own kernels on the file's blocks, logits of every row). All engines score the token ids of the first artifact's
tokenizer with the same windows, so the numbers differ only by the model arithmetic.
Prints a markdown table and writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def hf_logits_fn(spec: str):
    import torch

    from llmc.compiler.frontend.hf import load_hf_model, resolve_source

    model = load_hf_model(resolve_source(spec)).eval()

    def fn(ids):
        with torch.no_grad():
            return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()

    return fn


def int8_dot(artifact: str) -> str:
    """" int8-dot" when the artifact's quantized linears run on int8 activations (intdot layouts)."""
    with open(os.path.join(artifact, "manifest.json")) as f:
        weights = json.load(f)["plan"]["weights"]
    return " int8-dot" if any(w.get("layout", "").startswith("intdot") for w in weights.values()) else ""


def llamacpp_logits_fn(path: str, window: int, threads):
    """llama.cpp's logits of every row of a window (one eval per window, on a fresh context)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                          n_threads=threads or os.cpu_count(), n_threads_batch=threads or os.cpu_count(),
                          verbose=False)

    def fn(ids):
        llm.reset()
        llm.eval([int(i) for i in ids])
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    return fn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--hf", metavar="MODEL", help="also measure transformers fp32 on MODEL (e.g. smollm2)")
    p.add_argument("--llamacpp", metavar="GGUF", help="also measure llama.cpp (llama-cpp-python) on GGUF")
    p.add_argument("--text", default=os.path.join(REPO, "benchmarks", "data", "english.txt"))
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "perplexity.json"))
    args = p.parse_args()

    from llmc.runtime import Engine
    from llmc.runtime.perplexity import all_logits, perplexity

    text = open(args.text, encoding="utf-8").read()
    rows, ids = [], None
    for path in args.artifacts:
        engine = Engine.load(path, threads=args.threads)
        if ids is None:
            ids = np.asarray(engine.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
        t0 = time.perf_counter()
        res = perplexity(ids, lambda w, e=engine: all_logits(e.executor, w), args.window, args.stride)
        rows.append({"engine": f"llmc {engine.manifest.model.get('quant', 'none')}{int8_dot(path)}", "artifact": path,
                     "perplexity": res.perplexity, "tokens": res.tokens, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        del engine
    if args.hf:
        t0 = time.perf_counter()
        res = perplexity(ids, hf_logits_fn(args.hf), args.window, args.stride)
        rows.append({"engine": "transformers fp32", "artifact": args.hf, "perplexity": res.perplexity,
                     "tokens": res.tokens, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    if args.llamacpp:
        t0 = time.perf_counter()
        res = perplexity(ids, llamacpp_logits_fn(args.llamacpp, args.window, args.threads), args.window, args.stride)
        rows.append({"engine": "llama.cpp", "artifact": args.llamacpp, "perplexity": res.perplexity,
                     "tokens": res.tokens, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    ref = next((r["perplexity"] for r in rows if r["engine"] in ("llmc none", "transformers fp32")), None)
    print(f"\n{len(ids)} tokens of {os.path.basename(args.text)}, windows of {args.window}, stride {args.stride}\n")
    print("| engine | perplexity | vs fp32 |\n| --- | --- | --- |")
    for r in rows:
        rel = f"{100 * (r['perplexity'] / ref - 1):+.2f}%" if ref else "-"
        print(f"| {r['engine']} | {r['perplexity']:.4f} | {rel} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"text": args.text, "window": args.window, "stride": args.stride, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
