"""Paged-KV lowering: the traced ``attention`` ops become ``kv_append`` + ``paged_attention``
over per-layer block pools, and ``@forward`` becomes the batched step of DESIGN.md.

Before, ``@forward(input_ids, positions[, logits_index])`` serves one sequence whose cache is
implicit state of each ``attention`` op. After, the function takes the step interface

    input_ids [T], positions [T], slot_mapping [T], block_tables [B, MB], seq_lens [B],
    query_start [B + 1], logits_index [B] (when select-logits ran), then k_pool_l, v_pool_l
    ([NB, BS, Hkv, D] and [NB, BS, Hkv, Dv]) for every layer l,

and returns the logits followed by every updated pool. ``T`` tokens of ``B`` sequences share
one step (prefill chunks and decode tokens alike); ``NB`` blocks of ``BS`` positions form each
layer's pool; the runtime owns which sequence holds which block. Nothing about the cache is
left implicit, so the reference interpreter runs a mixed batch exactly as code generators do.
"""

from __future__ import annotations

from ..ir import Module, Op, TensorType, Value, symbol
from ..ir.builder import NameAllocator
from ..ir.recurrent import STEP_OPS, state_shape
from .base import Pass
from .registry import register_pass

DEFAULT_BLOCK_SIZE = 16
STEP_ARGS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index",
             "state_slots")


class PagedKVError(ValueError):
    pass


@register_pass
class PagedKV(Pass):
    """Rewrite each attention into kv_append + paged_attention over per-layer KV block pools.

    Requires: @forward(input_ids, positions[, logits_index], ...) with one top-level
    ``attention`` op per layer (layers 0..L-1). Guarantees: no ``attention`` op is left; @forward has the
    step interface of DESIGN.md and returns the updated pools after its own results. The block
    size is ``block_size``, else the module attribute ``kv_block_size``, else 16."""

    name = "paged-kv"
    guarantees = ("paged-kv",)

    def __init__(self, block_size: int | None = None):
        self.block_size = block_size

    def run(self, module: Module) -> Module:
        fn = module.functions["forward"]
        if any(a.name == "block_tables" for a in fn.args):
            return module  # already lowered
        nested = [op for op in fn.body.walk() if op.kind == "attention" and op not in fn.ops]
        if nested:
            raise PagedKVError("paged-kv: an attention op sits inside a fused region; run paged-kv before fusion "
                               "passes that could capture it")
        attention = [op for op in fn.ops if op.kind == "attention"]
        stateful = [op for op in fn.ops if op.kind in STEP_OPS]
        if not attention and not stateful:
            return module
        layers = sorted(op.attrs["layer"] for op in attention)
        if layers != list(range(len(layers))):
            raise PagedKVError(f"paged-kv: expected one attention op per layer 0..L-1, got layers {layers}")
        block_size = int(self.block_size or module.attrs.get("kv_block_size") or DEFAULT_BLOCK_SIZE)
        if block_size < 1:
            raise PagedKVError(f"paged-kv: the KV block size must be >= 1, got {block_size}")
        missing = [name for name in ("input_ids", "positions") if name not in {a.name for a in fn.args}]
        if missing:
            raise PagedKVError(f"paged-kv: @forward lacks the step arguments {missing}")

        names = NameAllocator()
        names.reserve_block(fn.body)
        tokens, seqs = symbol("T"), symbol("B")
        max_blocks, pool_blocks = symbol("MB"), symbol("NB")
        by_name = {a.name: a for a in fn.args}

        def new_arg(name: str, shape, dtype: str = "i64") -> Value:
            return Value(names.take(name), TensorType(tuple(shape), dtype))

        step = {
            "input_ids": by_name["input_ids"],
            "positions": by_name["positions"],
            "slot_mapping": new_arg("slot_mapping", [tokens]),
            "block_tables": new_arg("block_tables", [seqs, max_blocks]),
            "seq_lens": new_arg("seq_lens", [seqs]),
            "query_start": new_arg("query_start", [seqs + 1]),
        }
        if "logits_index" in by_name:
            step["logits_index"] = by_name["logits_index"]

        pools: list[Value] = []
        updated: list[Value] = []
        by_layer = {op.attrs["layer"]: op for op in attention}
        replacement: dict[int, list[Op]] = {}
        for layer in range(len(layers)):
            op = by_layer[layer]
            q, k, v, _positions = op.operands[:4]
            sinks = list(op.operands[4:])
            k_pool = new_arg(f"k_pool_{layer}", [pool_blocks, block_size, k.type.shape[1], k.type.shape[2]],
                             k.type.dtype)
            v_pool = new_arg(f"v_pool_{layer}", [pool_blocks, block_size, v.type.shape[1], v.type.shape[2]],
                             v.type.dtype)
            pools += [k_pool, v_pool]
            k_new = Value(names.take(f"k_pool_{layer}_new"), k_pool.type)
            v_new = Value(names.take(f"v_pool_{layer}_new"), v_pool.type)
            append = Op("kv_append", [k_pool, v_pool, k, v, step["slot_mapping"]], {}, [k_new, v_new])
            attrs = {key: op.attrs[key] for key in ("scale", "window", "softcap", "chunk", "alibi") if key in op.attrs}
            paged = Op("paged_attention", [q, k_new, v_new, step["block_tables"], step["seq_lens"],
                                           step["query_start"]] + sinks, attrs, list(op.results))
            replacement[id(op)] = [append, paged]
            updated += [k_new, v_new]

        states, updated_states = [], []
        if stateful:
            step["state_slots"] = new_arg("state_slots", [seqs])
            slots_symbol = symbol("NS")
            for op in stateful:
                index = op.attrs["state"]
                shape, dtype = state_shape(op)
                pool = new_arg(f"state_pool_{index}", [slots_symbol, *shape], dtype)
                new_pool = Value(names.take(f"state_pool_{index}_new"), pool.type)
                if op.kind == "causal_conv1d":
                    x, w, _positions = op.operands[:3]
                    inputs, extra = [x, w], list(op.operands[3:])
                else:
                    inputs, extra = list(op.operands[:5]), []
                stepped = Op(STEP_OPS[op.kind], [pool, *inputs, step["state_slots"], step["seq_lens"],
                                                  step["query_start"], *extra],
                             {k: v for k, v in op.attrs.items() if k != "state"}, [op.results[0], new_pool])
                replacement[id(op)] = [stepped]
                states.append(pool)
                updated_states.append(new_pool)

        new_ops = []
        for op in fn.ops:
            new_ops.extend(replacement.get(id(op), [op]))
        fn.body.ops = new_ops
        others = [a for a in fn.args if a.name not in STEP_ARGS]  # kept, after the step's own
        fn.body.args[:] = [step[name] for name in STEP_ARGS if name in step] + others + pools + states
        fn.body.results = list(fn.body.results) + updated + updated_states
        return module
