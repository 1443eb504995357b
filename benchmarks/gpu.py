#!/usr/bin/env python3
"""GPU benchmark: llmc's cuda target against HF transformers (eager and torch.compile).

Models are built from configurations with random bf16 weights on the machine itself (no hub,
no GGUF): ``smollm2`` (SmolLM2-135M's shape: launch-bound decode) and ``llama1b``
(Llama-3.2-1B's shape: bandwidth-bound decode). For each:

  check        llmc's prefill logits vs HF eager (bf16 tolerance) and 16 greedy tokens
  decode-B     tokens/s of one-token steps of B sequences (B = 1, 8, 32) after a 128-token
               prompt each; only decode steps are timed
  prefill-N    tokens/s of one N-token prompt (N = 512, 2048), empty cache
  roofline     batch-1 decode bytes per token (every weight once + the KV cache read) x tokens/s,
               over the device-to-device copy bandwidth measured here (torch copy of 1 GiB)

llmc runs through ``llmc.runtime`` (CudaExecutor: AOT cubins launched through cuda-bindings,
CUDA graphs for decode), compiled for this GPU's arch by ``llmc compile DIR --target cuda``.
HF eager decodes with its dynamic cache; HF torch.compile uses a static cache and
``torch.compile(mode="reduce-overhead")``; both through ``generate`` (time of N+1 new tokens
minus time of 1, over N).

    python benchmarks/gpu.py                      # both models, everything
    python benchmarks/gpu.py --models llama1b --engines llmc --repeats 3
Results go to benchmarks/results/gpu_<arch>.json and print as a markdown table.

Status: written without a GPU; it has not run yet.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                    rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
PROMPT = 128
DECODE_STEPS = 64


def build_hf(shape: str, out_dir: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def compile_llmc(model_dir: str, out_dir: str, arch: str, max_len: int) -> None:
    from llmc.compiler.codegen import CompileOptions
    from llmc.compiler.driver import compile_artifact
    from llmc.compiler.frontend import import_hf_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    imported = import_hf_model(hf)
    compile_artifact(imported, None, "cuda", out_dir, CompileOptions(arch=arch, max_seq_len=max_len))


def device_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / statistics.median(times[2:])


class LlmcRunner:
    """Sequences over the executor's block pool: contiguous block ranges per sequence."""

    def __init__(self, artifact: str, max_seqs: int):
        from llmc.runtime.artifact import read_manifest
        from llmc.runtime.executor_cuda import load_gpu_executor

        self.manifest = read_manifest(artifact)
        geom = self.manifest.kv_cache
        self.per_seq = -(-int(geom["max_model_len"]) // int(geom["block_size"]))
        self.ex = load_gpu_executor(self.manifest, num_blocks=max_seqs * self.per_seq)

    def step(self, seqs: list[tuple[int, list[int], int]]) -> np.ndarray:
        """seqs: (sequence slot, new token ids, tokens already in the cache)."""
        from llmc.runtime.step import StepBatch

        bs = self.ex.block_size
        ids, pos, slots, starts, lens, rows, tables = [], [], [], [0], [], [], []
        for slot, new, done in seqs:
            base = slot * self.per_seq
            p = np.arange(done, done + len(new))
            ids += new
            pos += p.tolist()
            slots += (base * bs + p).tolist()
            starts.append(starts[-1] + len(new))
            lens.append(done + len(new))
            rows.append(starts[-1] - 1)
            tables.append(np.arange(base, base + self.per_seq))
        batch = StepBatch(np.array(ids), np.array(pos), np.array(slots), np.stack(tables), np.array(lens),
                          np.array(starts), np.array(rows))
        return self.ex.step(batch)


def llmc_bench(runner: LlmcRunner, batches, prefills, repeats: int) -> dict:
    out = {}
    vocab = runner.ex.vocab_size
    g = np.random.default_rng(0)
    for b in batches:
        if b * runner.per_seq > runner.ex.num_blocks:
            continue
        results = []
        for _ in range(repeats):
            prompts = [g.integers(3, vocab, PROMPT).tolist() for _ in range(b)]
            logits = runner.step([(i, prompts[i], 0) for i in range(b)])
            tokens = logits.argmax(-1).tolist()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for s in range(DECODE_STEPS):
                logits = runner.step([(i, [tokens[i]], PROMPT + s) for i in range(b)])
                tokens = logits.argmax(-1).tolist()
            torch.cuda.synchronize()
            results.append(b * DECODE_STEPS / (time.perf_counter() - t))
        out[f"decode-{b}"] = statistics.median(results)
    for n in prefills:
        results = []
        for _ in range(repeats):
            prompt = g.integers(3, vocab, n).tolist()
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.step([(0, prompt, 0)])
            torch.cuda.synchronize()
            results.append(n / (time.perf_counter() - t))
        out[f"prefill-{n}"] = statistics.median(results)
    return out


def hf_bench(model, batches, prefills, repeats: int, compiled: bool) -> dict:
    out = {}
    vocab = model.config.vocab_size
    kwargs = dict(do_sample=False, pad_token_id=0)
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def gen(ids, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        for b in batches:
            ids = torch.randint(3, vocab, (b, PROMPT), device="cuda")
            gen(ids, DECODE_STEPS + 1)  # warm-up (and compilation)
            results = []
            for _ in range(repeats):
                results.append(b * DECODE_STEPS / (gen(ids, DECODE_STEPS + 1) - gen(ids, 1)))
            out[f"decode-{b}"] = statistics.median(results)
        for n in prefills:
            ids = torch.randint(3, vocab, (1, n), device="cuda")
            model(ids)
            results = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                results.append(n / (time.perf_counter() - t))
            out[f"prefill-{n}"] = statistics.median(results)
    return out


def check(model, runner: LlmcRunner) -> dict:
    """llmc vs HF eager: prefill logits (bf16 tolerance) and 16 greedy tokens."""
    g = np.random.default_rng(1)
    prompt = g.integers(3, model.config.vocab_size, 40).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu().numpy()
        hf_tokens = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                                   do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    slot = runner.ex.num_blocks // runner.per_seq - 1
    got = runner.step([(slot, prompt, 0)])[0]
    tokens, done = [], len(prompt)
    token = int(got.argmax())
    for _ in range(16):
        tokens.append(token)
        token = int(runner.step([(slot, [token], done)])[0].argmax())
        done += 1
    err = float(np.abs(got - ref).max())
    return {"max_logit_diff": err, "logit_scale": float(np.abs(ref).max()),
            "greedy_equal": tokens == hf_tokens, "greedy_prefix": next((i for i, (a, b) in enumerate(
                zip(tokens, hf_tokens)) if a != b), 16)}


def roofline(model, tok_s: float, bandwidth: float, context: int) -> dict:
    c = model.config
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2  # bf16, tied embedding read as the LM head
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = c.num_hidden_layers * context * c.num_key_value_heads * head_dim * 2 * 2
    per_token = weight_bytes + kv_bytes
    return {"bytes_per_token": per_token, "copy_bandwidth_GBs": bandwidth / 1e9,
            "roofline_tok_s": bandwidth / per_token, "fraction": tok_s * per_token / bandwidth}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--engines", default="llmc,hf,hf-compile")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefills", default="512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where models and artifacts are built (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    arch = device_arch()
    batches = [int(x) for x in args.batches.split(",")]
    prefills = [int(x) for x in args.prefills.split(",")]
    engines = args.engines.split(",")
    work = args.workdir or tempfile.mkdtemp(prefix="llmc-gpu-bench-")
    bandwidth = copy_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(), "arch": arch, "torch": torch.__version__,
              "copy_bandwidth_GBs": bandwidth / 1e9, "models": {}}
    for shape in args.models.split(","):
        model_dir = os.path.join(work, shape)
        model = build_hf(shape, model_dir).cuda().eval()
        entry = report["models"][shape] = {}
        if "llmc" in engines:
            art = os.path.join(work, f"{shape}-{arch}")
            t = time.perf_counter()
            compile_llmc(model_dir, art, arch, max_len=max(prefills) + 64)
            entry["compile_s"] = time.perf_counter() - t
            runner = LlmcRunner(art, max(batches))
            entry["check"] = check(model, runner)
            entry["llmc"] = llmc_bench(runner, batches, prefills, args.repeats)
            if "decode-1" in entry["llmc"]:
                entry["roofline"] = roofline(model, entry["llmc"]["decode-1"], bandwidth, PROMPT + DECODE_STEPS // 2)
            del runner
        if "hf" in engines:
            entry["hf"] = hf_bench(model, batches, prefills, args.repeats, compiled=False)
        if "hf-compile" in engines:
            entry["hf-compile"] = hf_bench(model, batches, prefills, args.repeats, compiled=True)
        del model
        torch.cuda.empty_cache()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"gpu_{arch}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    keys = [f"decode-{b}" for b in batches] + [f"prefill-{n}" for n in prefills]
    print(f"{report['gpu']} ({arch}), copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for shape, entry in report["models"].items():
        print(f"\n{shape}: " + json.dumps({k: entry[k] for k in ("check", "roofline") if k in entry}))
        print("| tok/s | " + " | ".join(e for e in engines if e in entry) + " |")
        print("| --- |" + " --- |" * sum(e in entry for e in engines))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{entry[e].get(k, float('nan')):.1f}" for e in engines if e in entry) + " |")


if __name__ == "__main__":
    main()
