"""Lower an optimized, paged llmc IR module to a TVM Relax module: one Relax function per entry
point (``prefill`` with dynamic token and sequence counts, ``decode`` with one token of one
sequence), each a straight sequence of kernel calls that the Relax VM runs without returning
to Python.

The step's calling convention (the runtime's executor follows it; see runtime/step.py):

    fn(input_ids: i64[T], positions: i64[T], slot_mapping: i64[T], block_tables: i64[B, MB],
       seq_lens: i64[B], query_start: i64[B + 1], logits_index: i64[B],
       k_pool_0, v_pool_0, ..., k_pool_{L-1}, v_pool_{L-1}, *weights) -> f32[B, vocab]

Each layer's key pool is [NB, Hkv, D, BS] (transposed inside a block, so scores vectorize over
key positions) and its value pool [NB, BS, Hkv, Dv]; ``kv_append`` updates them in place
(call_tir_inplace), so the function returns only the logits. Weights read by a ``linear``
are stored packed ([N/PACK, K, PACK]); the manifest records every weight's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import tvm
from tvm import relax, tirx as tir

from ...ir import Block, Module, Op, Value
from .attention import SCALE_BYTES, kv_append_kernel, paged_attention_kernel, tile_rows
from .intdot import (BLOCK, IntDotIsa, eligible, halves, intdot_linear_kernel, quantize_rows_kernel, storage_bits,
                     weight_interleave)
from .kernels import BUILDERS, PACK, TVM_DTYPES, DimMap, IntDotWeight, PackedWeight, Scalar
from .recurrent import conv_step_kernel, delta_rule_step_kernel

STEP_ARGS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index")


class CodegenError(NotImplementedError):
    pass


@dataclass
class CacheGeometry:
    """The KV pools of the paged step: one key and one value pool per layer. ``kv_heads``,
    ``head_dim`` and ``value_dim`` are layer 0's; ``per_layer`` lists (kv_heads, head_dim,
    value_dim) of every layer when they differ (models mixing attention shapes, MiMo-V2)."""

    layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: str = "f32"
    per_layer: Optional[list] = None

    def layer(self, index: int) -> "CacheGeometry":
        """The geometry of one layer's pools."""
        if not self.per_layer:
            return self
        h, d, dv = self.per_layer[index]
        return CacheGeometry(1, self.block_size, h, d, dv, self.dtype)

    @property
    def scale_bytes(self) -> int:
        """Entries an int8 pool adds to each head_dim / value_dim: the position's float32 scale."""
        return SCALE_BYTES if self.dtype == "i8" else 0

    def shape(self, blocks, value: bool = False) -> list:
        """Keys [blocks, Hkv, D, BS] (transposed in a block: scores vectorize over positions);
        values [blocks, BS, Hkv, Dv]; int8 pools have ``scale_bytes`` more in D and Dv."""
        if value:
            return [blocks, self.block_size, self.kv_heads, self.value_dim + self.scale_bytes]
        return [blocks, self.kv_heads, self.head_dim + self.scale_bytes, self.block_size]

    @property
    def bytes_per_block(self) -> int:
        itemsize = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1}[self.dtype]
        shapes = self.per_layer or [(self.kv_heads, self.head_dim, self.value_dim)] * self.layers
        return sum(self.block_size * h * (d + dv + 2 * self.scale_bytes) * itemsize for h, d, dv in shapes)


def cache_geometry(module: Module) -> CacheGeometry:
    """The pools of a module the paged-kv pass lowered (its k_pool_l / v_pool_l arguments)."""
    fn = module.functions["forward"]
    names = [a.name for a in fn.args]
    if "block_tables" not in names:
        if any(op.kind == "attention" for op in fn.ops):
            raise CodegenError("the module still has attention ops: run the paged-kv pass before code generation "
                               "(every -O level's pipeline ends with it)")
        raise CodegenError("the model has no attention op; llmc compiles decoder LMs with a KV cache")
    pools = {a.name: a.type for a in fn.args if a.name.startswith(("k_pool_", "v_pool_"))}
    layers = len(pools) // 2
    if layers == 0 and state_pools(module):  # attention-free (Mamba): recurrent state only, no KV blocks
        return CacheGeometry(0, int(module.attrs.get("kv_block_size") or 16), 0, 0, 0)
    if sorted(pools) != sorted([f"k_pool_{i}" for i in range(layers)] + [f"v_pool_{i}" for i in range(layers)]):
        raise CodegenError(f"expected k_pool_l / v_pool_l arguments for layers 0..L-1, got {sorted(pools)}")
    shapes = {(tuple(pools[f"k_pool_{i}"].shape[1:]), tuple(pools[f"v_pool_{i}"].shape[1:]), pools[f"k_pool_{i}"].dtype)
              for i in range(layers)}
    if len({(k[0], dtype) for k, _, dtype in shapes}) != 1:
        raise CodegenError(f"layers with different KV block sizes or dtypes are not supported: {shapes}")
    per_layer = [(int(pools[f"k_pool_{i}"].shape[2]), int(pools[f"k_pool_{i}"].shape[3]),
                  int(pools[f"v_pool_{i}"].shape[3])) for i in range(layers)]
    bs, dtype = int(pools["k_pool_0"].shape[1]), pools["k_pool_0"].dtype
    h, d, dv = per_layer[0]
    return CacheGeometry(layers, bs, h, d, dv, dtype, per_layer if len(set(per_layer)) > 1 else None)


def _param_of(v: Value, outer: dict[int, Value]) -> Optional[str]:
    """The param name a value reads, looking through region arguments to the fused op's operands."""
    v = outer.get(id(v), v)
    if v.producer is not None and v.producer.kind == "param":
        return v.producer.attrs["name"]
    return None


def _visit_ops(module: Module, fn) -> None:
    """``fn(op, outer)`` for every op, regions included (``outer``: region arg -> operand)."""
    def visit(block: Block, outer: dict[int, Value]):
        for op in block.ops:
            fn(op, outer)
            if op.region is not None:
                visit(op.region, {id(a): outer.get(id(v), v) for a, v in zip(op.region.args, op.operands)})

    visit(module.functions["forward"].body, {})


def intdot_params(module: Module, isa: Optional[IntDotIsa]) -> dict[str, dict]:
    """Weights of the quantized linears that run on integer dot products (``intdot.py``):
    name -> {"role": codes|groups, "lanes": L}. A weight another op also reads (a quantized
    embedding tied to the LM head) keeps the blocked float-path layout."""
    if isa is None:
        return {}
    chosen: dict[str, dict] = {}
    other: set[str] = set()

    def fn(op: Op, outer):
        if op.region is not None:  # a fused op's operands are judged by the ops of its region
            return
        names = [_param_of(v, outer) for v in op.operands]
        if op.kind == "quantized_linear" and None not in names[1:]:
            n, k = op.result.type.shape[-1], op.operands[0].type.shape[-1]
            if eligible(op.attrs["bits"], op.attrs["group_size"], n, k, isa, op.attrs.get("codebook")):
                bits = storage_bits(op.attrs["bits"])
                info = {"lanes": isa.lanes, "bits": bits, "signed": op.attrs["signed"],
                        "interleave": weight_interleave(isa, n, bits)}
                chosen[names[1]] = {"role": "codes", **info}
                for name in names[2:]:
                    chosen[name] = {"role": "groups", **info}
                return
        if op.kind == "quantized_embedding":  # a gather reads any layout (IntDotWeight)
            return
        other.update(n for n in names if n is not None)

    _visit_ops(module, fn)
    return {name: info for name, info in chosen.items() if name not in other}


def packed_params(module: Module, isa: Optional[IntDotIsa] = None) -> set[str]:
    """Weights read as the weight of a ``linear`` (they get the packed layout), except those
    the integer kernels read (``intdot_params``)."""
    out: set[str] = set()

    def visit(block: Block, outer: dict[int, Value]):
        for op in block.ops:
            if op.kind == "linear":
                name = _param_of(op.operands[1], outer)
                n = op.operands[1].type.shape[0]
                if name is not None and isinstance(n, int) and n % PACK == 0:
                    out.add(name)
            if op.kind == "quantized_linear":  # codes, scales and mins share the blocked layout
                names = [_param_of(v, outer) for v in op.operands[1:]]
                n = op.operands[1].type.shape[0]
                if None not in names and isinstance(n, int) and n % PACK == 0:
                    out.update(names)
            if op.region is not None:
                visit(op.region, {id(a): outer.get(id(v), v) for a, v in zip(op.region.args, op.operands)})

    visit(module.functions["forward"].body, {})
    return out - set(intdot_params(module, isa))


def weight_order(module: Module) -> list[str]:
    """The order weights are passed in: the param table's."""
    used = {op.attrs["name"] for op in module.functions["forward"].body.walk() if op.kind == "param"}
    return [name for name in module.params if name in used]


def _relax_type(t, dims: DimMap):
    return relax.TensorType(dims.shape(t.shape), TVM_DTYPES[t.dtype])


class _KernelCtx:
    def __init__(self, kind: str, dims: DimMap):
        self.kind, self.dims = kind, dims

    def shape(self, t):
        return self.dims.shape(t.shape)

    def dim(self, d):
        return self.dims(d)


@dataclass
class AttentionOptions:
    """How the attention kernels are shaped for the target CPU."""

    threads: int = 2       # parallel width the work items are interleaved for
    lanes: int = 16        # float32 lanes of a vector register
    registers: int = 32    # vector registers
    intdot: Optional[IntDotIsa] = None  # integer dot products for 4-bit linears (None: float path)
    kv_dtype: Optional[str] = None  # IR dtype of the KV pools, f32 or f16 (None: the IR's)


class Backend:
    """What a GPU target changes in the lowering (the cpu target passes none and keeps the
    defaults): the dtype each IR value is stored in (kernels widen stored fp16 operands to the
    IR's fp32 on load and narrow results on store, so arithmetic and accumulation stay fp32),
    the KV pools' dtype, and its own kv_append / paged_attention kernels."""

    kv_dtype: Optional[str] = None  # IR dtype of the KV pools (None: the IR's)

    def storage(self, value: Value) -> str:
        return value.type.dtype

    def param_storage(self, name: str) -> str:
        raise NotImplementedError

    def kv_append_kernel(self, geom: "CacheGeometry", keys: bool):
        raise NotImplementedError

    def paged_attention_kernel(self, op: Op, geom: "CacheGeometry", decode: bool, dtype: str):
        raise NotImplementedError


def _widen(te_tensor, dtype: str):
    """An fp32 view of a stored operand (the scheduler inlines it into the loads)."""
    from tvm import te

    if dtype == te_tensor.dtype:
        return te_tensor
    return te.compute(te_tensor.shape, lambda *i: te_tensor[i].astype(dtype), name="widen")


def _narrow(te_tensor, dtype: str):
    from tvm import te

    if dtype == te_tensor.dtype:
        return te_tensor
    return te.compute(te_tensor.shape, lambda *i: te_tensor[i].astype(dtype), name="narrow")


@dataclass
class _FunctionLowering:
    bb: relax.BlockBuilder
    module: Module
    dims: DimMap
    packed: set[str]
    intdot: dict[str, dict]
    weights: dict[str, relax.Var]
    geom: CacheGeometry
    attention: AttentionOptions
    decode: bool
    pool_blocks: Any = None  # the TIR var of the pools' block count
    backend: Optional[Backend] = None
    env: dict[int, Any] = field(default_factory=dict)
    param_names: dict[int, str] = field(default_factory=dict)  # IR value id -> param it reads
    quantized: dict[Any, list] = field(default_factory=dict)  # relax activation -> its int8 blocks

    def operand(self, v: Value):
        return self.env[id(v)]

    def wrap(self, value, te_tensor):
        """A TE placeholder for a relax value, as the kernel builders expect it."""
        if isinstance(value, _IntDot):
            return IntDotWeight(te_tensor, value.info["lanes"], value.info["bits"], value.info.get("interleave", 1))
        if isinstance(value, _Packed):
            return PackedWeight(te_tensor, value.n, value.k)
        return te_tensor

    def emit_kernel(self, name: str, build, operands: list[Any], op: Optional[Op] = None):
        """emit_te over the tensor operands; scalars and packed flags travel by closure. With a
        backend, stored operands are widened to the IR's dtypes and results narrowed to theirs."""
        tensor_positions = [i for i, o in enumerate(operands) if not isinstance(o, Scalar)]
        relax_args = [operands[i].expr if isinstance(operands[i], _Packed) else operands[i]
                      for i in tensor_positions]
        convert = self.backend is not None and op is not None

        def te_fn(*te_args):
            full = list(operands)
            for i, te_arg in zip(tensor_positions, te_args):
                if convert:
                    te_arg = _widen(te_arg, TVM_DTYPES[op.operands[i].type.dtype])
                full[i] = self.wrap(operands[i], te_arg)
            out = build(full)
            if convert:
                outs = out if isinstance(out, (list, tuple)) else [out]
                outs = [_narrow(t, TVM_DTYPES[self.backend.storage(r)]) for t, r in zip(outs, op.results)]
                out = outs if isinstance(out, (list, tuple)) else outs[0]
            return out

        return self.bb.emit_te(te_fn, *relax_args, primfunc_name_hint=name)

    def lower_op(self, op: Op):
        kind = op.kind
        if kind == "param":
            name = op.attrs["name"]
            self.param_names[id(op.result)] = name
            var = self.weights[name]
            if name in self.packed:
                n, k = (int(d) for d in self.module.params[name].type.shape)
                return _Packed(var, n, k)
            if name in self.intdot:
                n, k = (int(d) for d in self.module.params[name].type.shape)
                return _IntDot(var, n, k, self.intdot[name])
            return var
        if kind == "constant":
            return Scalar(op.attrs["value"], op.attrs["dtype"])
        operands = [self.operand(v) for v in op.operands]
        if kind == "reshape" and not isinstance(operands[0], (_Packed, Scalar)):
            return self.bb.emit(relax.op.reshape(operands[0], self.dims.shape(op.attrs["shape"])))
        if kind == "kv_append":
            return self.lower_kv_append(operands, op)
        if kind == "paged_attention":
            return self.lower_paged_attention(op, operands)
        if kind in ("causal_conv1d_step", "gated_delta_rule_step"):
            return self.lower_state_step(op, operands)
        if op.region is not None:
            return self.lower_region(op, operands)
        if kind == "quantized_linear" and self.is_intdot(op, op.operands):
            return self.lower_intdot(op, operands)
        if kind not in BUILDERS:
            raise CodegenError(f"op '{kind}' has no TVM kernel")
        ctx = _KernelCtx(kind, self.dims)
        if len(op.results) > 1:
            out = self.emit_kernel(kind, lambda full: BUILDERS[kind](full, op.attrs, op.results[0].type, ctx),
                                   operands, op)
            return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(op.results))]
        out_type = op.result.type
        return self.emit_kernel(kind, lambda full: BUILDERS[kind](full, op.attrs, out_type, ctx), operands, op)

    def is_intdot(self, op: Op, values) -> bool:
        """Whether this quantized_linear's weights are in the integer-kernel layout."""
        names = [self.param_names.get(id(v)) for v in values[1:]]
        return bool(names) and all(n in self.intdot for n in names)

    def lower_intdot(self, op: Op, operands, up=None):
        """quantize_rows (int8 activation blocks) then the integer-dot linear; x is viewed as
        [M, K] and the result reshaped back. ``up``: fuse the gated MLP's silu(y) * up."""
        isa = self.attention.intdot
        x = operands[0]
        k, n = int(op.operands[0].type.shape[-1]), int(op.result.type.shape[-1])
        lead = self.dims.shape(op.result.type.shape[:-1])
        m = tir.IntImm("int64", 1)
        for d in lead:
            m = m * d
        h = halves(op.attrs["group_size"])  # groups of 16: activation sums per half block
        parts = self.quantized.get((x, h))  # q, k, v (gate, up) read one x: quantize it once
        if parts is None:
            x2 = self.bb.emit(relax.op.reshape(x, [m, k])) if len(lead) != 1 else x
            qk = self.bb.add_func(quantize_rows_kernel(k, parallel=not self.decode, halves=h), "quantize_rows")
            q = self.bb.emit(relax.call_tir(qk, [x2], [relax.TensorType([m, k // 4], "int32"),
                                                    relax.TensorType([m, k // BLOCK], "float32"),
                                                    relax.TensorType([m, h * k // BLOCK], "float32")]))
            parts = self.quantized[(x, h)] = [self.bb.emit(relax.TupleGetItem(q, i)) for i in range(3)]
        codes, scales = operands[1].expr, operands[2].expr
        mins = operands[3].expr if len(operands) == 4 else scales
        sdt = TVM_DTYPES[op.operands[2].type.dtype]
        bits = storage_bits(op.attrs["bits"])
        kernel = intdot_linear_kernel(isa, n, k, op.attrs["group_size"], op.attrs["signed"], len(operands) == 4,
                                      sdt, self.decode, self.attention.threads, glu=up is not None,
                                      bits=bits, ilv=weight_interleave(isa, n, bits), codebook=op.attrs.get("codebook"))
        fn = self.bb.add_func(kernel, f"intdot_linear{'_glu' if up is not None else ''}_n{n}_k{k}")
        extra = []
        if up is not None:
            extra = [self.bb.emit(relax.op.reshape(up, [m, n])) if len(lead) != 1 else up]
        y = self.bb.emit(relax.call_tir(fn, parts + [codes, scales, mins] + extra, relax.TensorType([m, n], "float32")))
        if len(lead) != 1:
            y = self.bb.emit(relax.op.reshape(y, lead + [tir.IntImm("int64", n)]))
        return y

    def lower_region(self, op: Op, operands):
        region = op.region
        inner_names = {id(a): self.param_names.get(id(v)) for a, v in zip(region.args, op.operands)}
        anchor = next((o for o in region.ops if o.kind == "quantized_linear"), None)
        pre = {}
        if anchor is not None and all(inner_names.get(id(v)) in self.intdot for v in anchor.operands[1:]):
            by_arg = {id(a): o for a, o in zip(region.args, operands)}
            rest = [o for o in region.ops if o is not anchor and o.kind != "constant"]
            if (len(rest) == 1 and rest[0].kind == "glu" and rest[0].attrs["activation"] == "silu"
                    and rest[0].operands[0] is anchor.result and id(rest[0].operands[1]) in by_arg
                    and rest[0].operands[1].type.shape == anchor.result.type.shape
                    and region.results == [rest[0].result] and len(op.results) == 1):
                # the gated MLP: silu(gate) * up in the integer kernel's write-back
                return self.lower_intdot(anchor, [by_arg[id(v)] for v in anchor.operands],
                                         up=by_arg[id(rest[0].operands[1])])
            # the integer kernel computes the anchor; the rest of the region is its epilogue kernel
            y = self.lower_intdot(anchor, [by_arg[id(v)] for v in anchor.operands])
            pre[id(anchor.result)] = len(operands)
            operands = list(operands) + [y]

        def build(full):
            env = {id(a): v for a, v in zip(region.args, full)}
            for vid, pos in pre.items():
                env[vid] = full[pos]
            for inner in region.ops:
                if id(inner.result) in pre:
                    continue
                if inner.kind == "constant":
                    env[id(inner.result)] = Scalar(inner.attrs["value"], inner.attrs["dtype"])
                    continue
                if inner.kind not in BUILDERS:
                    raise CodegenError(f"op '{inner.kind}' in fused region {op.attrs['name']} has no TVM kernel")
                ins = [env[id(v)] for v in inner.operands]
                env[id(inner.result)] = BUILDERS[inner.kind](ins, inner.attrs, inner.result.type,
                                                             _KernelCtx(inner.kind, self.dims))
            outs = [env[id(v)] for v in region.results]
            return outs if len(outs) > 1 else outs[0]

        out = self.emit_kernel(op.attrs["name"].rsplit("_", 1)[0], build, operands, op)
        if len(op.results) == 1:
            return out
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(op.results))]

    def op_geometry(self, k_pool: Value, v_pool: Value) -> CacheGeometry:
        """The pool geometry of the layer whose IR pools ([NB, BS, Hkv, D]) an op reads."""
        _, _, h, d = (int(x) if isinstance(x, int) else x for x in k_pool.type.shape)
        return CacheGeometry(1, self.geom.block_size, int(h), int(d), int(v_pool.type.shape[3]), self.geom.dtype)

    def lower_kv_append(self, operands, op: Op):
        k_pool, v_pool, k, v, slots = operands
        g = self.op_geometry(op.operands[0], op.operands[1])
        dtype = TVM_DTYPES[g.dtype]
        blocks = self.pool_blocks
        if self.backend is not None:
            kw = self.bb.add_func(self.backend.kv_append_kernel(g, True), "kv_append_k")
            vw = self.bb.add_func(self.backend.kv_append_kernel(g, False), "kv_append_v")
        else:  # this step's keys / values arrive in the IR's dtype; the store narrows them to the pool's
            kdt, vdt = (TVM_DTYPES[x.type.dtype] for x in op.operands[2:4])
            kw = self.bb.add_func(kv_append_kernel(g.kv_heads, g.head_dim, g.block_size, True, kdt, dtype),
                                  "kv_append_k")
            vw = self.bb.add_func(kv_append_kernel(g.kv_heads, g.value_dim, g.block_size, False, vdt, dtype),
                                  "kv_append_v")
        k_pool = self.bb.emit(relax.call_tir_inplace(kw, [k, slots, k_pool], [2],
                                                     relax.TensorType(g.shape(blocks), dtype)))
        v_pool = self.bb.emit(relax.call_tir_inplace(vw, [v, slots, v_pool], [2],
                                                     relax.TensorType(g.shape(blocks, value=True), dtype)))
        return [k_pool, v_pool]

    def lower_paged_attention(self, op: Op, operands):
        g, opts = self.op_geometry(op.operands[1], op.operands[2]), self.attention
        if self.backend is not None:
            dtype = TVM_DTYPES[self.backend.storage(op.result)]
            kernel = self.backend.paged_attention_kernel(op, g, self.decode, dtype)
            out_type = relax.TensorType(self.dims.shape(op.result.type.shape), dtype)
            return self.bb.emit(relax.call_tir(self.bb.add_func(kernel, "paged_attention"), list(operands), out_type))
        if g.dtype not in ("f32", "f16", "i8"):
            raise CodegenError(f"the cpu attention kernel reads float32, float16 or int8 KV pools, not {g.dtype}")
        hq = int(op.operands[0].type.shape[1])
        rows = 1 if self.decode else tile_rows(hq // g.kv_heads, g.block_size, opts.lanes, opts.registers)
        kernel = paged_attention_kernel(hq, g.kv_heads, g.head_dim, g.value_dim, g.block_size, op.attrs["scale"],
                                        op.attrs["window"], op.attrs["softcap"], rows, opts.threads,
                                        sinks=len(op.operands) == 7, lanes=opts.lanes, registers=opts.registers,
                                        chunk=op.attrs.get("chunk", 0), alibi=op.attrs.get("alibi"),
                                        kv_dtype=TVM_DTYPES[g.dtype])
        out_type = relax.TensorType(self.dims.shape(op.result.type.shape), "float32")
        return self.bb.emit(relax.call_tir(self.bb.add_func(kernel, "paged_attention"), list(operands), out_type))


    def lower_state_step(self, op: Op, operands):
        """A recurrent-state step op: its kernel updates the state pool (operand 0) in place
        and writes the output into a fresh tensor."""
        pool, rest = operands[0], operands[1:]
        if any(isinstance(o, (Scalar, _Packed)) for o in operands):
            raise CodegenError(f"{op.kind}: an operand is a constant or a packed weight; expected tensors")
        if op.kind == "causal_conv1d_step":
            channels, width = (int(d) for d in op.operands[2].type.shape)
            if width < 2:
                raise CodegenError(f"causal_conv1d_step: a kernel width of {width} carries no state")
            kernel = conv_step_kernel(channels, width, len(op.operands) == 7, TVM_DTYPES[op.operands[1].type.dtype])
        else:
            q, v, g = op.operands[1].type, op.operands[3].type, op.operands[4].type
            if q.dtype != "f32":
                raise CodegenError(f"the cpu gated_delta_rule_step kernel computes in float32, not {q.dtype}")
            kernel = delta_rule_step_kernel(int(q.shape[1]), int(q.shape[2]), int(v.shape[2]), g.rank == 3,
                                            op.attrs.get("delta", True))
        out_type = relax.TensorType(self.dims.shape(op.results[0].type.shape), TVM_DTYPES[op.results[0].type.dtype])
        pool_type = relax.TensorType(self.dims.shape(op.results[1].type.shape), TVM_DTYPES[op.results[1].type.dtype])
        args = list(rest) + [pool]
        call = self.bb.emit(relax.call_tir_inplace(self.bb.add_func(kernel, op.kind), args, [-1, len(args) - 1],
                                                   [out_type, pool_type]))
        return [self.bb.emit(relax.TupleGetItem(call, 0)), self.bb.emit(relax.TupleGetItem(call, 1))]


def state_pools(module: Module) -> list:
    """The recurrent-state pools of a paged module (its state_pool_i arguments), in order."""
    return [a for a in module.functions["forward"].args if a.name.startswith("state_pool_")]


@dataclass
class _Packed:
    expr: relax.Var
    n: int
    k: int


@dataclass
class _IntDot(_Packed):
    info: dict = None


def lower_function(bb: relax.BlockBuilder, module: Module, name: str, geom: CacheGeometry,
                   packed: set[str], order: list[str], tokens, rows, attention: AttentionOptions,
                   backend: Optional[Backend] = None, intdot: Optional[dict] = None) -> None:
    """Add Relax function ``name`` to ``bb``: the IR's paged @forward with T = tokens and B = rows
    (ints for a static entry point, or TIR vars for a dynamic one)."""
    fn = module.functions["forward"]
    blocks = tir.Var("NB", "int64")
    dims = DimMap({"T": tokens, "B": rows, "MB": tir.Var("MB", "int64"), "NB": blocks, "NS": tir.Var("NS", "int64")})
    args = {a.name: relax.Var(a.name, _relax_type(a.type, dims)) for a in fn.args
            if a.name in STEP_ARGS or a.name == "state_slots"}
    missing = set(STEP_ARGS) - set(args)
    if missing:
        raise CodegenError(f"@forward lacks {sorted(missing)}; run select-logits and paged-kv before codegen")
    states = {a.name: relax.Var(a.name, _relax_type(a.type, dims)) for a in state_pools(module)}
    extra = [a.name for a in fn.args if a.name not in args and a.name not in states
             and not a.name.startswith(("k_pool_", "v_pool_"))]
    if extra:
        raise CodegenError(f"@forward takes arguments {extra} that the runtime does not provide")
    dtype = TVM_DTYPES[geom.dtype]
    pools = {}
    for layer in range(geom.layers):
        lg = geom.layer(layer)
        pools[f"k_pool_{layer}"] = relax.Var(f"k_pool_{layer}", relax.TensorType(lg.shape(blocks), dtype))
        pools[f"v_pool_{layer}"] = relax.Var(f"v_pool_{layer}", relax.TensorType(lg.shape(blocks, True), dtype))
    weights = {}
    for wname in order:
        t = module.params[wname].type
        shape = [int(d) for d in t.shape]
        dtype = TVM_DTYPES[t.dtype]
        if wname in packed:
            shape = [shape[0] // PACK, shape[1], PACK]
        wdtype = TVM_DTYPES[t.dtype if backend is None else backend.param_storage(wname)]
        if wname in (intdot or {}):
            shape, wdtype = intdot_shape(shape, t.dtype, intdot[wname])
        weights[wname] = relax.Var("w_" + wname.replace(".", "_"), relax.TensorType(shape, wdtype))
    step_names = list(STEP_ARGS) + (["state_slots"] if "state_slots" in args else [])
    params = [args[n] for n in step_names] + list(pools.values()) + list(states.values()) + list(weights.values())
    # num_input: the VM checks the step's inputs and pools on every call but not the weights'
    # static shapes (~1.4k builtin calls a step); the runtime checks each weight's shape and
    # dtype once at load, and every kernel still asserts its buffers' shapes.
    inputs = len(params) - len(weights)
    with bb.function(name, params, attrs={"global_symbol": name, "num_input": inputs}):
        with bb.dataflow():
            low = _FunctionLowering(bb, module, dims, packed, intdot or {}, weights, geom, attention,
                                    isinstance(tokens, int), blocks, backend)
            for a in fn.args:
                low.env[id(a)] = {**args, **pools, **states}[a.name]
            for op in fn.ops:
                result = low.lower_op(op)
                if len(op.results) == 1:
                    low.env[id(op.result)] = result
                else:
                    for r, x in zip(op.results, result):
                        low.env[id(r)] = x
            out = low.operand(fn.results[0])
            out = bb.emit_output(out)
        bb.emit_func_output(out)


def lower_to_relax(module: Module, attention: Optional[AttentionOptions] = None,
                   backend: Optional[Backend] = None) -> tuple[tvm.IRModule, dict]:
    """The Relax module with ``prefill`` (dynamic T, B) and ``decode`` (T = B = 1) entry points,
    and the layout facts the artifact records. ``backend``: a GPU target's changes (see Backend)."""
    attention = attention or AttentionOptions()
    geom = cache_geometry(module)
    if backend is not None and backend.kv_dtype:
        geom.dtype = backend.kv_dtype
    elif backend is None and attention.kv_dtype:  # the cpu's --kv-dtype
        geom.dtype = attention.kv_dtype
    fn = module.functions["forward"]
    pools_returned = [v.producer.kind if v.producer is not None else "argument" for v in fn.results[1:]]
    n_states = len(state_pools(module))
    kv_returned, states_returned = pools_returned[:2 * geom.layers], pools_returned[2 * geom.layers:]
    if len(fn.results) != 1 + 2 * geom.layers + n_states or any(kind != "kv_append" for kind in kv_returned) or \
            any(kind not in ("causal_conv1d_step", "gated_delta_rule_step") for kind in states_returned):
        raise CodegenError("@forward must return the logits followed by the updated KV pools (the paged-kv pass's form)")
    isa = attention.intdot if backend is None else None  # integer kernels are the cpu's
    intdot = intdot_params(module, isa)
    packed = packed_params(module, isa)
    order = weight_order(module)
    bb = relax.BlockBuilder()
    lower_function(bb, module, "prefill", geom, packed, order, tir.Var("T", "int64"), tir.Var("B", "int64"), attention,
                   backend, intdot)
    lower_function(bb, module, "decode", geom, packed, order, 1, 1, attention, backend, intdot)
    states = [{"name": a.name, "shape": [int(d) for d in a.type.shape[1:]], "dtype": a.type.dtype}
              for a in state_pools(module)]
    layout = {"cache": geom, "packed": sorted(packed), "weight_order": order, "pack": PACK, "states": states,
              "intdot": intdot}
    return bb.get(), layout


def intdot_shape(shape: list[int], dtype: str, info: dict) -> tuple[list[int], str]:
    """Stored shape and TVM dtype of a weight in the integer-kernel layout (intdot.py)."""
    lanes, ilv = info["lanes"], info.get("interleave", 1)
    if info["role"] == "codes":  # [N, K/2] (4-bit) or [N, K] bytes -> i32 [N/(L*ilv), K/32, bits*L*ilv]
        k = shape[1] * 2 if info["bits"] == 4 else shape[1]
        return [shape[0] // (lanes * ilv), k // BLOCK, info["bits"] * lanes * ilv], "int32"
    return [shape[0] // (lanes * ilv), shape[1], lanes * ilv], TVM_DTYPES[dtype]
