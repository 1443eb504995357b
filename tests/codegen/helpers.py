"""Compile models to cpu artifacts in tests, and the HF greedy reference."""

import os

import torch

from llmc.compiler.codegen import CompileOptions
from llmc.compiler.driver import compile_artifact
from llmc.compiler.frontend import ImportedModel
from llmc.compiler.ir import parse_module, print_module


def compile_cpu(imported: ImportedModel, out_dir, tokenizer=None, max_seq_len: int = 256, cache_dir=None,
                mcpu=None, kv_block_size=None, quant="none", kv_dtype=None):
    """Compile a copy of ``imported`` (fixtures stay untouched) into a cpu artifact."""
    copy = ImportedModel(parse_module(print_module(imported.module)), imported.weights, imported.config)
    options = CompileOptions(max_seq_len=max_seq_len, cache_dir=str(cache_dir) if cache_dir else None, mcpu=mcpu,
                             kv_block_size=kv_block_size, kv_dtype=kv_dtype)
    return compile_artifact(copy, tokenizer, "cpu", str(out_dir), options, quant=quant)


def compile_gguf_cpu(model, path: str, out_dir, tokenizer=None, float_activations: bool = False,
                     max_seq_len: int = 256):
    """A cpu artifact keeping the GGUF file's own blocks. ``float_activations``: every quantized
    linear on float activations (LLMC_NO_INTDOT=1) and float32 KV pools, where llmc must equal
    transformers to rounding (the default float16 pools alone move the logits by ~2e-2)."""
    from llmc.compiler.frontend.hf import import_hf_model

    saved = os.environ.pop("LLMC_NO_INTDOT", None)
    try:
        if float_activations:
            os.environ["LLMC_NO_INTDOT"] = "1"
        options = CompileOptions(max_seq_len=max_seq_len, kv_dtype="float32" if float_activations else None)
        compile_artifact(import_hf_model(model), tokenizer, "cpu", str(out_dir), options, source=path, quant=None)
    finally:
        os.environ.pop("LLMC_NO_INTDOT", None)
        if saved is not None:
            os.environ["LLMC_NO_INTDOT"] = saved
    return out_dir


def hf_greedy(model, prompt_ids, new_tokens: int):
    """Greedy continuation by transformers (fp32, its own KV cache), exactly ``new_tokens`` long,
    plus the prefill logits of the last prompt token. A model whose forward keeps no usable
    cache (GPT-1; recurrent models whose state lives in their modules) runs each step over the
    whole prefix."""
    from tests.frontend.arch_sweep import NO_HF_CACHE, cache_of

    def recomputed(first_logits):
        ids, tokens, logits = list(prompt_ids), [], first_logits
        for _ in range(new_tokens):
            tokens.append(int(logits.argmax()))
            ids.append(tokens[-1])
            logits = model(torch.tensor([ids])).logits[0, -1]
        return tokens, first_logits.numpy()

    if model.config.model_type in NO_HF_CACHE:
        with torch.no_grad():
            return recomputed(model(torch.tensor([prompt_ids])).logits[0, -1])
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        if getattr(out, "past_key_values", None) is None:
            return recomputed(out.logits[0, -1])
        prefill_logits = out.logits[0, -1]

        past, token, tokens = cache_of(model, out), int(out.logits[0, -1].argmax()), []
        for _ in range(new_tokens):
            tokens.append(token)
            out = model(torch.tensor([[token]]), **past, use_cache=True)
            past, token = cache_of(model, out), int(out.logits[0, -1].argmax())
    return tokens, prefill_logits.numpy()


def llmc_greedy(engine, prompt_ids, new_tokens: int):
    engine.reset()
    logits = engine.step(prompt_ids)
    prefill_logits, tokens = logits, []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        logits = engine.step([token])
    return tokens, prefill_logits


def extreme_codes_and_activations(bits: int, signed: bool, n: int, k: int, seed: int):
    """Codes ``[n, k]`` at both ends of their range (rows of all-max, all-min, alternating and
    random codes) and int8 activations ``[5, k]`` of +-127 in every lane (plus a random row):
    the inputs that would saturate or wrap an integer dot product's accumulator."""
    import numpy as np

    from llmc.compiler.ir.quant import code_range

    lo, hi = code_range(bits, signed)
    rng = np.random.default_rng(seed)
    raw = np.empty((n, k), np.int32)
    raw[0::4], raw[1::4] = hi, lo
    raw[2::4] = np.where(np.arange(k) % 2 == 0, hi, lo)
    raw[3::4] = rng.integers(lo, hi + 1, (n // 4, k))
    q = np.empty((5, k), np.int8)
    q[0], q[1] = 127, -127
    q[2] = np.where(np.arange(k) % 2 == 0, 127, -127)
    q[3] = -q[2]
    q[4] = rng.integers(-127, 128, k)
    return torch.from_numpy(raw), q
