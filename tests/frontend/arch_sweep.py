"""Registry-wide sweep: every causal-LM model type of the installed transformers, built tiny,
traced, imported into IR and run by the reference interpreter against transformers.

Why: llmc takes models by tracing at the attention boundary, so in principle it covers any
decoder transformers ships; this measures how many it really does and, for each one that
fails, says where (stage) and why (the first line of the error). ``arch_expectations.json``
(next to this file) records the outcome per model type and makes it a ratchet
(``test_arch_sweep.py``).

Stages, in order: ``excluded`` (not a decoder-only LM: encoders used as decoders and the
decoder halves of encoder-decoder models), ``build`` (transformers cannot build a tiny random
config of it; not counted), ``hf`` (transformers' own forward fails on it; not counted),
``trace``, ``import``, ``interpret``, ``parity`` (logits differ from transformers), ``pass``.

    python -m tests.frontend.arch_sweep                    # whole registry, table on stdout
    python -m tests.frontend.arch_sweep --only llama,gpt2  # a few
    python -m tests.frontend.arch_sweep --json out.json --update-expectations
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Optional

import torch

EXPECTATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arch_expectations.json")
PROMPT_LEN = 14   # longer than every tiny sliding window / chunk (6)
DECODE_STEPS = 2
WINDOW = 6

# Encoders that transformers also offers as a causal LM (is_decoder=True) and the decoder
# halves of encoder-decoder models: not decoder-only language models, so out of scope.
NOT_DECODER_ONLY = {
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
    "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "xlnet", "reformer", "prophetnet",
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
    "pegasus", "plbart", "trocr", "whisper", "musicgen", "musicgen_melody", "moshi",
}

# Tiny sizes, applied to every config attribute of these names that the config has.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_layers=2,
    n_layer=2, n_layers=2, num_attention_heads=4, num_key_value_heads=2, num_heads=4,
    head_dim=16, max_position_embeddings=256, n_positions=256, max_seq_len=256,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, top_k=2, moe_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    expert_intermediate_size=32, n_shared_experts=1, num_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, moe_layer_freq=1, decoder_sparse_step=1,
    # windows, chunks and low-rank projections smaller than the prompt / the hidden size
    sliding_window=WINDOW, attention_chunk_size=WINDOW, kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# attributes that describe the tiny model; any config attribute of these names that is a
# positive int larger than the tiny value is also clamped (under other names configs agree on)
SUB_CONFIGS = ("text_config", "language_config", "decoder_config", "llm_config")


@dataclass
class Outcome:
    model_type: str
    status: str          # pass | fail | excluded | unbuildable
    stage: str           # excluded | build | hf | trace | import | interpret | parity | pass
    reason: str = ""
    seconds: float = 0.0
    max_error: Optional[float] = None
    cpu: Optional[str] = None         # pass | fail (compiled for cpu, greedy vs transformers)
    cpu_reason: str = ""


class SweepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise SweepTimeout(f"took longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def registry() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config) -> None:
    tiny = dict(TINY)
    if getattr(config, "qk_rope_head_dim", None):  # MLA: head_dim is the rotary part
        tiny["head_dim"] = tiny["qk_rope_head_dim"]
    for key, value in tiny.items():
        try:  # per-layer attributes refuse global access: leave those to the per-layer configs
            present = key in ("pad_token_id", "bos_token_id", "eos_token_id") or hasattr(config, key)
            current = getattr(config, key, None) if present else None
        except Exception:  # noqa: BLE001
            continue
        if present:
            if current is None and key not in ("pad_token_id", "bos_token_id", "eos_token_id",
                                               "sliding_window", "head_dim", "num_experts_per_tok",
                                               "num_key_value_heads", "num_local_experts", "moe_intermediate_size"):
                continue
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    if hasattr(config, "conv_L_cache") and getattr(config, "layer_types", 0) is None:  # LFM2-MoE: no default list
        with contextlib.suppress(Exception):
            config.layer_types = ["conv", "full_attention"]
            config.num_dense_layers = 1  # layer 1's feed-forward is the MoE
    if isinstance(getattr(config, "full_attn_idxs", None), list):  # LFM2: layer 0 convolution, layer 1 attention
        with contextlib.suppress(Exception):
            config.full_attn_idxs = [1]
            config.layer_types = ["conv", "full_attention"]
    # hybrids placing attention / MoE layers by offset and period (Jamba, Zamba): with two layers,
    # layer 0 keeps its recurrent mixer and layer 1 gets attention (and experts)
    for key, value in (("attn_layer_offset", 1), ("attn_layer_period", 2), ("expert_layer_offset", 1),
                       ("expert_layer_period", 2)):
        if isinstance(getattr(config, key, None), int):
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    # layer-type lists sized for the default depth: keep the first two (one of each kind when present)
    for key in ("layer_types", "mlp_layer_types", "block_types", "layers_block_type"):
        types = getattr(config, key, None)
        if isinstance(types, (list, tuple)) and len(types) > 2:
            kinds = list(dict.fromkeys(types))
            with contextlib.suppress(Exception):
                setattr(config, key, (kinds + kinds)[:2] if len(kinds) >= 2 else list(types[:2]))
    _fit_hybrid(config)
    for sub in SUB_CONFIGS:
        c = getattr(config, sub, None)
        if c is not None and hasattr(c, "to_dict"):
            _shrink(c)


RECURRENT_KINDS = {"linear_attention", "mamba"}


def _fit_hybrid(config) -> None:
    """Mamba-2 hybrids after shrinking: heads x head dim must again cover the mixer width, and
    a hybrid whose two layers kept no attention layer gets one (transformers' cache for these
    models needs an attention layer to report its length)."""
    expand = getattr(config, "mamba_expand", None) or getattr(config, "expand", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(expand, (int, float)) and isinstance(hidden, int):
        inner = int(getattr(config, "mamba_d_ssm", None) or expand * hidden)
        pairs = [("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")]
        if hasattr(config, "n_groups") and (hasattr(config, "state_size") or hasattr(config, "ssm_state_size")):
            pairs.append(("num_heads", "head_dim"))  # Mamba2Config's own names
        for heads, dim in pairs:
            h, d = getattr(config, heads, None), getattr(config, dim, None)
            if isinstance(h, int) and isinstance(d, int) and h * d != inner and inner % 8 == 0:
                with contextlib.suppress(Exception):
                    setattr(config, heads, 8)
                    setattr(config, dim, inner // 8)
    kinds = None
    with contextlib.suppress(Exception):
        kinds = getattr(config, "layers_block_type", None) or getattr(config, "layer_types", None)
    heads = None
    with contextlib.suppress(Exception):  # heterogeneous (per-layer) configs refuse the global read
        heads = getattr(config, "num_attention_heads", None)
    if isinstance(kinds, (list, tuple)) and kinds and heads:
        rest = set(kinds) - RECURRENT_KINDS - {"moe", "mlp"}
        if not rest and set(kinds) & RECURRENT_KINDS:
            with contextlib.suppress(Exception):
                if hasattr(config, "attn_layer_indices") and getattr(config, "attn_layer_indices", None) is None:
                    config.attn_layer_indices = [1]  # Bamba: layer types follow from these indices
                else:
                    config.layer_types = [kinds[0], "full_attention"]


def _set(obj, **values):
    for key, value in values.items():
        setattr(obj, key, value)


# Model types whose default config cannot be built tiny by the generic shrink alone: the few
# attributes their code needs that the default leaves unset
def _rederive(config) -> None:
    """Recompute the attributes a config derives from its sizes at construction (Zamba's
    attention width, Mamba head dim, hybrid layer ids) from the shrunk sizes."""
    fresh = type(config)(**{k: v for k, v in config.to_dict().items()
                            if k not in ("model_type", "transformers_version", "architectures", "attention_hidden_size",
                                         "attention_head_dim", "mamba_headdim", "hybrid_layer_ids", "kv_channels",
                                         "num_query_groups")})
    for key, value in vars(fresh).items():
        with contextlib.suppress(Exception):
            setattr(config, key, value)


RECIPES = {
    "zamba": _rederive,
    "zamba2": _rederive,
    "dots1": lambda c: _set(c, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "cohere_compass_text": lambda c: _set(c, rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                               for t in ("full_attention", "sliding_attention")}),
    "gemma3n_text": lambda c: _set(c, num_kv_shared_layers=0, intermediate_size=[96, 96],
                                   activation_sparsity_pattern=[0.0, 0.0]),
}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    if model_type in RECIPES:
        RECIPES[model_type](config)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return config


def randomize_vectors(model, seed: int = 0) -> None:
    """from_config leaves norms at 1 and biases at 0: perturb every all-ones / all-zeros
    vector so that each one matters for parity (a dropped bias would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.dtype.is_floating_point:
                if bool((p == 0).all()) or bool((p == 1).all()):
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_model(model_type: str, seed: int = 0):
    """A random-weight tiny causal LM of ``model_type`` in eval mode (fp32)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_vectors(model, seed)
    return model


# model types whose transformers forward keeps no KV cache: each decode step's reference logits
# come from the whole prefix instead
NO_HF_CACHE = {"openai-gpt", "recurrent_gemma"}  # recurrent_gemma keeps its state in its modules


def cache_of(model, out) -> dict:
    """The keyword that hands ``out``'s cache to the next call: ``past_key_values``, or
    ``cache`` for models (Mamba) whose forward and outputs name it so."""
    import inspect

    if "past_key_values" not in inspect.signature(model.forward).parameters and hasattr(out, "cache"):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def hf_reference(model, ids: torch.Tensor, prompt_len: int):
    """transformers' prefill logits [T, V] and the logits of each decode step on its own cache."""
    if model.config.model_type in NO_HF_CACHE:
        with torch.no_grad():
            prefill = model(ids[None, :prompt_len]).logits[0].float()
            steps = [model(ids[None, :i + 1]).logits[0, -1].float() for i in range(prompt_len, ids.shape[0])]
        return prefill, steps
    with torch.no_grad():
        out = model(ids[None, :prompt_len], use_cache=True)
        prefill = out.logits[0].float()
        past, steps = cache_of(model, out), []
        for i in range(prompt_len, ids.shape[0]):
            step = model(ids[None, i:i + 1], **past, use_cache=True)
            past = cache_of(model, step)
            steps.append(step.logits[0, -1].float())
    return prefill, steps


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    err = float((got - want).abs().max())
    tol = 1e-3 * max(1.0, float(want.abs().max()))
    return err <= tol, err


def sweep_one(model_type: str, timeout: int = 180) -> Outcome:
    """Build, trace, import and compare one model type; never raises."""
    from llmc.compiler.frontend import import_hf_model
    from llmc.compiler.ir import Interpreter, KVCache, verify

    t0 = time.perf_counter()

    def done(status, stage, reason="", err=None):
        return Outcome(model_type, status, stage, reason, round(time.perf_counter() - t0, 1), err)

    if model_type in NOT_DECODER_ONLY:
        return done("excluded", "excluded", "not a decoder-only language model")
    stage = "build"
    try:
        with time_limit(timeout):
            model = tiny_model(model_type)
            stage = "hf"
            torch.manual_seed(123)
            vocab = int(model.config.get_text_config().vocab_size)
            ids = torch.randint(3, vocab, (PROMPT_LEN + DECODE_STEPS,))
            want_prefill, want_steps = hf_reference(model, ids, PROMPT_LEN)
            stage = "trace"
            from llmc.compiler.frontend import hf as hf_frontend

            program = hf_frontend.trace(model)
            stage = "import"
            imported = import_hf_model(model, program=program)
            verify(imported.module)
            stage = "interpret"
            interp = Interpreter(imported.module, imported.weights, KVCache())
            got = interp.run({"input_ids": ids[:PROMPT_LEN], "positions": torch.arange(PROMPT_LEN)})[0]
            got_steps = [interp.run({"input_ids": ids[i:i + 1], "positions": torch.tensor([i])})[0][0]
                         for i in range(PROMPT_LEN, ids.shape[0])]
    except Exception as exc:  # noqa: BLE001 - the sweep classifies every failure
        if os.environ.get("LLMC_SWEEP_TRACEBACK"):
            traceback.print_exc()
        status = "unbuildable" if stage in ("build", "hf") else "fail"
        return done(status, stage, _first_line(exc))
    worst = 0.0
    for what, g, w in [("prefill", got, want_prefill)] + [
            (f"decode step {j}", g, w) for j, (g, w) in enumerate(zip(got_steps, want_steps))]:
        ok, err = _close(g, w)
        worst = max(worst, err)
        if not ok:
            return done("fail", "parity", f"{what} logits differ from transformers by {err:.3g}", err)
    return done("pass", "pass", "", worst)


def cpu_one(model_type: str, new_tokens: int = 16, timeout: int = 600) -> tuple[str, str]:
    """Compile the tiny model for cpu and compare greedy continuations with transformers:
    ("pass", "") or ("fail", reason). Needs the cpu extra (TVM)."""
    import tempfile

    import numpy as np

    from llmc.compiler.frontend import import_hf_model
    from llmc.runtime import Engine
    from tests.codegen.helpers import compile_cpu, hf_greedy, llmc_greedy

    try:
        with time_limit(timeout), tempfile.TemporaryDirectory(prefix="llmc-sweep-") as tmp:
            model = tiny_model(model_type)
            compile_cpu(import_hf_model(model), os.path.join(tmp, "artifact"), max_seq_len=64,
                        cache_dir=os.path.join(tmp, "cache"))
            engine = Engine.load(os.path.join(tmp, "artifact"))
            vocab = int(model.config.get_text_config().vocab_size)
            prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()
            want, want_logits = hf_greedy(model, prompt, new_tokens)
            got, got_logits = llmc_greedy(engine, prompt, new_tokens)
            err = float(np.abs(got_logits - want_logits).max())
            if err > 1e-3 * max(1.0, float(np.abs(want_logits).max())):
                return "fail", f"prefill logits differ from transformers by {err:.3g}"
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                return "fail", f"greedy tokens differ from transformers at step {first}"
            return "pass", ""
    except Exception as exc:  # noqa: BLE001 - classified, like the interpreter sweep
        return "fail", _first_line(exc)


def load_expectations(path: str = EXPECTATIONS) -> dict:
    with open(path) as f:
        return json.load(f)["model_types"]


def summary(outcomes: list[Outcome]) -> dict:
    counted = [o for o in outcomes if o.status in ("pass", "fail")]
    return {"decoder_only_buildable": len(counted), "pass": sum(o.status == "pass" for o in counted),
            "cpu_checked": sum(o.cpu is not None for o in counted), "cpu_pass": sum(o.cpu == "pass" for o in counted),
            "registry": len(outcomes)}


def write_expectations(outcomes: list[Outcome], path: str = EXPECTATIONS) -> None:
    import transformers

    data = {
        "transformers": transformers.__version__,
        "summary": summary(outcomes),
        "model_types": {o.model_type: {"status": o.status, "stage": o.stage, "reason": o.reason,
                                       **({"cpu": o.cpu, "cpu_reason": o.cpu_reason} if o.cpu else {})}
                        for o in sorted(outcomes, key=lambda o: o.model_type)},
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")


def markdown_table(outcomes: list[Outcome]) -> str:
    rows = ["| model type | interpreter | cpu | stage / reason |", "| --- | --- | --- | --- |"]
    for o in sorted(outcomes, key=lambda o: (o.status != "pass", o.status, o.model_type)):
        why = f"{o.stage}: {o.reason}" if o.status != "pass" else (o.cpu_reason or "")
        why = why.replace("|", "/").replace("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/", "")
        rows.append(f"| {o.model_type} | {o.status} | {o.cpu or '-'} | {why[:170]} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: the whole registry)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model type")
    parser.add_argument("--json", help="write every outcome to this file")
    parser.add_argument("--update-expectations", action="store_true",
                        help=f"rewrite {os.path.basename(EXPECTATIONS)} from this run (whole registry only)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--cpu", action="store_true",
                        help="also compile each model type that passes the interpreter for cpu and compare greedy "
                             "tokens (with --from-expectations: the recorded passes, without re-running them)")
    parser.add_argument("--from-expectations", action="store_true",
                        help="take interpreter outcomes from the expectations file instead of running them")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    types = args.only.split(",") if args.only else registry()
    outcomes = []
    recorded = load_expectations() if args.from_expectations else {}
    for mt in types:
        if args.from_expectations:
            e = recorded[mt]
            o = Outcome(mt, e["status"], e["stage"], e["reason"], cpu=e.get("cpu"), cpu_reason=e.get("cpu_reason", ""))
        else:
            o = sweep_one(mt, args.timeout)
        if args.cpu and o.status == "pass":
            t0 = time.perf_counter()
            o.cpu, o.cpu_reason = cpu_one(mt)
            o.seconds += round(time.perf_counter() - t0, 1)
        outcomes.append(o)
        print(f"{o.model_type:28s} {o.status:11s} {o.stage:9s} {o.seconds:6.1f}s cpu={o.cpu or '-':4s} "
              f"{o.reason or o.cpu_reason}", flush=True)
    s = summary(outcomes)
    print(f"\n{s['pass']} of {s['decoder_only_buildable']} buildable decoder-only model types pass the interpreter; "
          f"{s['cpu_pass']} of {s['cpu_checked']} checked pass through cpu (registry: {s['registry']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(o) for o in outcomes], f, indent=1)
    if args.update_expectations:
        old = load_expectations()
        if not args.cpu:  # an interpreter-only run keeps the recorded cpu outcomes of what still passes
            for o in outcomes:
                if o.status == "pass" and old.get(o.model_type, {}).get("cpu"):
                    o.cpu, o.cpu_reason = old[o.model_type]["cpu"], old[o.model_type].get("cpu_reason", "")
        if args.only:
            merged = {mt: Outcome(mt, **e) for mt, e in old.items()}
            merged.update({o.model_type: o for o in outcomes})
            outcomes = list(merged.values())
        write_expectations(outcomes)
    if args.markdown:
        print(markdown_table(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
