"""The compile pipeline as a function: imported model → passes → target → artifact.

The CLI and the tests both call this, so what `llmc compile` does is what is tested."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import llmc

from .codegen import CompileOptions, get_target
from .codegen.registry import PlannedTarget
from .frontend import ImportedModel
from .frontend.hf import BUNDLED_MODELS
from .passes import PassManager, get_pass


def resolve_target(name: str):
    """The target object; a planned target without a code generator raises TargetError now."""
    target = get_target(name)
    if isinstance(target, PlannedTarget):
        target.compile()
    return target


QUANT_TARGETS = ("cpu", "metal")  # targets with quantized_linear kernels
QUANT_METHODS = ("gptq", "search")  # what a symmetric scheme does with --quant-calibration


def calibration_method(scheme, method: str) -> str:
    """What calibration does for ``scheme`` under ``--quant-method``: GPTQ needs a symmetric
    scheme; asymmetric ones (and ``search``) get the scale search weighted by mean x^2."""
    return "gptq" if method == "gptq" and scheme.symmetric else "search"


def default_quant(source: str, target_name: str) -> str:
    """A GGUF source keeps its own blocks on a target with quantized kernels; else floats."""
    if target_name in QUANT_TARGETS and (source.endswith(".gguf") or source in BUNDLED_MODELS):
        return "gguf"
    return "none"


def quantize_pass(quant: str, imported: ImportedModel, source: str, target_name: str,
                  embedding: Optional[bool] = None, calibration: Optional[list] = None,
                  method: str = "gptq"):
    """The quantize pass for ``--quant`` (None for "none"); raises ValueError naming the fix.
    ``embedding``: quantize embedding tables too (default: yes for gguf, where the file's table
    is quantized; no for schemes). ``calibration``: token ids whose activations weight a
    scheme's scale search (``compiler/calibration.py``); None: unweighted. ``method``: what a
    symmetric scheme does with calibration: "gptq" (GPTQ from each linear's input Hessian,
    ``compiler/gptq.py``) or "search" (the scale search weighted by mean x^2 only)."""
    from .passes.quantize import Quantize, parse_scheme

    if quant == "none":
        return None
    if target_name not in QUANT_TARGETS:
        raise ValueError(f"--quant {quant}: the {target_name} target has no quantized kernels yet "
                         f"(targets with them: {', '.join(QUANT_TARGETS)}); use --quant none")
    if quant == "gguf":
        if calibration is not None:
            raise ValueError("--quant-calibration weights a scheme's scale search, but --quant gguf keeps the "
                             "file's own blocks; pick a scheme such as q4_g32, or drop --quant-calibration")
        from .frontend.gguf_weights import GgufBlocks
        from .frontend.hf import resolve_source

        src = resolve_source(source) if source else None
        if src is None or not src.gguf_file:
            raise ValueError(f"--quant gguf keeps a GGUF file's own blocks, but the source {source or '(none)'} "
                             f"is not a .gguf file; pick a scheme (llmc compile --quant list)")
        provider = GgufBlocks(src.display, imported.config)
        head = None
    else:
        scheme = parse_scheme(quant)
        if method not in QUANT_METHODS:
            raise ValueError(f"unknown --quant-method {method!r}; choose one of {', '.join(QUANT_METHODS)}")
        importance, hessians = None, None
        if calibration is not None:
            from .calibration import linear_hessians, linear_importance

            t0 = time.perf_counter()
            if calibration_method(scheme, method) == "gptq":
                hessians = linear_hessians(imported.module, imported.weights, calibration)
                importance = {name: h.diagonal().float() for name, h in hessians.items()}
            else:
                importance = linear_importance(imported.module, imported.weights, calibration)
            logging.getLogger("llmc.progress").info("calibration: %d tokens, %d linears (%.1fs)%s", len(calibration),
                                                    len(importance), time.perf_counter() - t0,
                                                    "; GPTQ" if hessians else "")
        provider = scheme.provider(importance, hessians, len(calibration or ()))
        # the LM head (and a table tied to it) keeps 8 bits under a 4-bit scheme, as llama.cpp's
        # Q4 files keep theirs at 6-8 bits: int4 logits cost far more accuracy than they save
        head = parse_scheme(scheme.name.replace("q4", "q8", 1)).provider(importance) if scheme.bits == 4 else None
    imported.weights = dict(imported.weights)  # the pass replaces entries: leave the caller's dict alone
    return Quantize(imported.weights, provider, embedding=(quant == "gguf") if embedding is None else embedding,
                    lm_head_provider=head)


def _report_gguf_blocks(blocks) -> None:
    """Say which GGUF block types the artifact keeps, and warn for every quantized tensor of the
    file that stays float (the artifact would then hold it inflated, silently)."""
    from .frontend.gguf_scaled_codes import SCALED_TYPES
    from .frontend.gguf_weights import QUANT_TYPES

    progress = logging.getLogger("llmc.progress")
    kept = blocks.kept()
    progress.info("GGUF blocks kept: %s", ", ".join(f"{t} x{n}" for t, n in kept.items()) or "none")
    wider = [f"{t} as {SCALED_TYPES[t].bits}-bit codes" for t in kept
             if t in SCALED_TYPES and SCALED_TYPES[t].codebook is None]
    if wider:  # exact, but the artifact is bigger than the file (see README "Quantized weights")
        progress.info("GGUF blocks read exactly into wider codes: %s", ", ".join(wider))
    inflated = blocks.inflated()
    if inflated:
        types: dict[str, int] = {}
        for t in inflated.values():
            types[t] = types.get(t, 0) + 1
        logging.getLogger("llmc").warning(
            "%d quantized GGUF tensors stay float in the artifact (%s; first: %s); llmc keeps %s blocks "
            "(requantize the file to one of them to keep its size)", len(inflated),
            ", ".join(f"{t} x{n}" for t, n in sorted(types.items())), next(iter(inflated)), ", ".join(QUANT_TYPES))


def optimize_for_target(imported: ImportedModel, target_name: str, options: Optional[CompileOptions] = None,
                        passes=None, manager_options=None, source: str = "", quant: str = "none",
                        quant_embedding: Optional[bool] = None, calibration: Optional[list] = None,
                        quant_method: str = "gptq"):
    """Run select-logits, the quantize pass for ``quant`` and ``passes`` (default: the target's
    -O2) over ``imported.module``, which becomes the optimized module: what the target's code
    generator lowers. Returns the seconds the passes took."""
    from .passes import build_pipeline
    from .passes.registry import LOWERING

    from .codegen.registry import default_kv_block_size

    options = options or CompileOptions()
    imported.module.attrs["kv_block_size"] = options.kv_block_size or default_kv_block_size(target_name)
    passes = list(build_pipeline(target_name, 2) if passes is None else passes)
    qpass = quantize_pass(quant, imported, source, target_name, quant_embedding, calibration, quant_method)
    if qpass is not None:  # before fusion (it sees top-level linears only), else before the lowerings
        names = [p.name for p in passes]
        cut = names.index("fuse-elementwise") if "fuse-elementwise" in names else len(passes)
        while cut > 0 and passes[cut - 1].name in LOWERING:
            cut -= 1
        passes.insert(cut, qpass)
    manager = PassManager([get_pass("select-logits")] + list(passes), **(manager_options or {}))
    t0 = time.perf_counter()
    logging.getLogger("llmc.progress").info("optimizing: %d passes", len(manager.passes))
    module = manager.run(imported.module)
    imported.module = module
    elapsed = time.perf_counter() - t0
    if qpass is not None:
        kinds = [op.kind for op in module.functions["forward"].body.walk()]
        logging.getLogger("llmc.progress").info("quantized (%s): %d linears, %d embeddings", quant,
                                                kinds.count("quantized_linear"), kinds.count("quantized_embedding"))
        if quant == "gguf":
            _report_gguf_blocks(qpass.provider)
    return elapsed


def compile_artifact(imported: ImportedModel, tokenizer, target_name: str, out_dir: str,
                     options: Optional[CompileOptions] = None, passes=None, manager_options=None,
                     source: str = "", quant: Optional[str] = "none",
                     quant_embedding: Optional[bool] = None, quant_calibration: Optional[str] = None,
                     quant_method: str = "gptq") -> dict:
    """Optimize ``imported`` (:func:`optimize_for_target`) and write the target's artifact to
    ``out_dir``. Returns the stage timings. Nothing is written if a stage fails.

    ``quant``: "none" (floats), "gguf" (a quantized GGUF's own blocks), a scheme such as
    "q4_g32", or None for the default of the source and target (:func:`default_quant`).
    ``quant_calibration``: a text file whose activations weight a scheme's scale search
    (``compiler/calibration.py``); it must not be the text the artifact is evaluated on.
    ``quant_method``: with calibration, "gptq" or "search" (:func:`quantize_pass`)."""
    target = resolve_target(target_name)
    options = options or CompileOptions()
    quant = default_quant(source, target_name) if quant is None else quant
    calibration = None
    if quant_calibration is not None:
        if quant == "none":
            raise ValueError("--quant-calibration weights a scheme's scale search; add --quant q4_g32 (or another "
                             "scheme), or drop --quant-calibration")
        from .calibration import read_calibration_tokens

        calibration = read_calibration_tokens(quant_calibration, tokenizer)
    elapsed = optimize_for_target(imported, target_name, options, passes, manager_options, source, quant,
                                  quant_embedding, calibration, quant_method)
    module = imported.module
    timings = {"passes": elapsed}
    config = imported.config
    metadata = {"llmc_version": llmc.__version__, "name": module.name, "arch": module.attrs.get("arch"),
                "vocab_size": int(config.get("vocab_size") or 0), "config": config, "source": source,
                "quant": quant}
    if quant_calibration is not None:
        metadata["quant_calibration"] = os.path.basename(quant_calibration)
        from .passes.quantize import parse_scheme

        metadata["quant_method"] = calibration_method(parse_scheme(quant), quant_method)
    timings.update(target.compile(module, imported.weights, out_dir, options, metadata,
                                  tokenizer))
    return timings
