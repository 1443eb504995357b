#!/usr/bin/env python3
"""A real K-quant or IQ GGUF through llmc end to end: requantize the bundled SmolLM2 Q4_1 GGUF with
llama.cpp's own quantizer, compile it with llmc, and compare greedy tokens with transformers
loading the same file.

    LLMC_LLAMA_QUANTIZE=/path/to/llama-quantize python benchmarks/kquant.py --types Q4_K_M,Q5_K_M

Per type it prints the file's tensors per block type, what the artifact keeps (the block type
recorded as each weight's origin in manifest.json; float weights are the norms only), sizes,
and per prompt the first token where llmc's greedy continuation leaves transformers' and the
largest prefill logit difference. Perplexity: benchmarks/perplexity.py --hf FILE --llamacpp
FILE ARTIFACT; speed: benchmarks/cpu.py --gguf FILE --artifact ARTIFACT.

llama-quantize comes from llama.cpp (benchmarks/build_llama_server.sh configures the sources;
`cmake --build BUILD --target llama-quantize`). SmolLM2's rows of 576 are no multiple of 256,
so llama.cpp falls back to Q5_0/Q5_1 (for Q4_K/Q5_K) and Q8_0 (for Q6_K) there: the K-quants
land on ffn_down (K = 1536).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]


def find_quantizer(explicit=None):
    """llama-quantize from --llama-quantize, $LLMC_LLAMA_QUANTIZE or PATH (None if absent)."""
    for cand in (explicit, os.environ.get("LLMC_LLAMA_QUANTIZE"), shutil.which("llama-quantize")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def requantize(quantizer: str, src: str, out: str, qtype: str, imatrix=None) -> str:
    """``llama-quantize --allow-requantize [--imatrix F] src out qtype`` (skipped if ``out`` exists)."""
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        extra = ["--imatrix", imatrix] if imatrix else []
        proc = subprocess.run([quantizer, "--allow-requantize", *extra, src, tmp, qtype, "1"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"llama-quantize failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


def tensor_types(path: str) -> dict:
    from gguf import GGUFReader

    return dict(sorted(collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def artifact_origins(artifact: str) -> dict:
    """Block type (or float) -> number of weights, from the manifest's per-weight origin."""
    with open(os.path.join(artifact, "manifest.json")) as f:
        weights = json.load(f)["plan"]["weights"]
    kinds = collections.Counter()
    for name, w in weights.items():
        if w["origin"].startswith("quantized:"):
            if name.endswith(".codes"):
                kinds[w["origin"].rsplit(":", 1)[1]] += 1
        else:
            kinds[f"float ({w['dtype']})"] += 1
    return dict(sorted(kinds.items()))


def hf_greedy(model, ids, n):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        first, past, tokens = out.logits[0, -1].numpy(), out.past_key_values, []
        tok = int(out.logits[0, -1].argmax())
        for _ in range(n):
            tokens.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
    return tokens, first


def llmc_greedy(engine, ids, n):
    engine.reset()
    logits = engine.step(ids)
    first, tokens = logits, []
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        logits = engine.step([tokens[-1]])
    return tokens, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="Q4_K_M", help="comma-separated llama-quantize types (default Q4_K_M)")
    p.add_argument("--out-dir", default="/tmp/kquant")
    p.add_argument("--imatrix", help="llama-imatrix output to quantize with (llama.cpp needs one for IQ1_*, IQ2_*; "
                                     "make it with llama-imatrix -m GGUF -f benchmarks/data/calibration.txt -o FILE)")
    p.add_argument("--llama-quantize", help="path of llama-quantize (else $LLMC_LLAMA_QUANTIZE, else PATH)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--mcpu", help="llmc compile --mcpu (default: this host)")
    p.add_argument("--no-intdot", action="store_true",
                   help="build with LLMC_NO_INTDOT=1 (float activations in every quantized linear; the "
                        "logits then equal transformers' to float rounding)")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "kquant.json"))
    args = p.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.compiler.frontend.hf import bundled_gguf
    from llmc.runtime import Engine

    quantizer = find_quantizer(args.llama_quantize)
    if quantizer is None:
        print("llama-quantize not found: pass --llama-quantize or set LLMC_LLAMA_QUANTIZE", file=sys.stderr)
        return 2
    src = bundled_gguf()
    stem = os.path.basename(src).rsplit(".", 2)[0]
    report = {"source": src, "quantizer": quantizer, "no_intdot": args.no_intdot, "files": {}}
    for qtype in [t.strip() for t in args.types.split(",") if t.strip()]:
        path = requantize(quantizer, src, os.path.join(args.out_dir, f"{stem}.{qtype}.gguf"), qtype, args.imatrix)
        artifact = os.path.join(args.out_dir, "art", qtype.lower() + ("-no-intdot" if args.no_intdot else ""))
        if not os.path.isfile(os.path.join(artifact, "manifest.json")):
            cmd = [sys.executable, "-m", "llmc.cli", "compile", path, "--target", "cpu", "-o", artifact]
            env = dict(os.environ, **({"LLMC_NO_INTDOT": "1"} if args.no_intdot else {}))
            subprocess.run(cmd + (["--mcpu", args.mcpu] if args.mcpu else []), check=True, env=env)
        entry = {"gguf": path, "gguf_bytes": os.path.getsize(path), "gguf_types": tensor_types(path),
                 "artifact": artifact, "weights_bytes": os.path.getsize(os.path.join(artifact, "weights.safetensors")),
                 "artifact_weights": artifact_origins(artifact), "prompts": []}
        print(f"{qtype}: {path} ({entry['gguf_bytes'] / 1e6:.1f} MB) tensors {entry['gguf_types']}")
        print(f"  artifact {artifact}: weights.safetensors {entry['weights_bytes'] / 1e6:.1f} MB, "
              f"weights {entry['artifact_weights']}")
        folder, name = os.path.dirname(path), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        engine = Engine.load(artifact)
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            want, want_first = hf_greedy(model, ids, args.tokens)
            got, got_first = llmc_greedy(engine, ids, args.tokens)
            same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
            diff = float(np.abs(np.asarray(got_first) - want_first).max())
            entry["prompts"].append({"prompt": prompt, "llmc": got, "hf": want, "equal_prefix": same,
                                     "prefill_max_abs_logit_diff": diff})
            print(f"  {prompt[:30]!r}: llmc = HF for {same} of {len(want)} greedy tokens, "
                  f"prefill max |logit diff| {diff:.2e}")
        report["files"][qtype] = entry
        del engine, model
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
