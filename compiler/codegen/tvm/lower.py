"""Lower an optimized llmc IR module to a TVM Relax module: one Relax function per entry point
(``prefill`` with a dynamic token count, ``decode`` with one token), each a straight sequence
of kernel calls that the Relax VM runs without returning to Python.

The step's calling convention (the runtime's executor follows it):

    fn(input_ids: i64[T], positions: i64[T], logits_index: i64[B], ctx: Shape[ctx_blocks],
       k_cache_0, v_cache_0, ..., k_cache_{L-1}, v_cache_{L-1}, *weights) -> f32[B, vocab]

``ctx_blocks`` = ceil((max position + 1) / 16): attention reads 16 * ctx_blocks cached
positions (the extra ones are masked; caches start zeroed). Each layer's key cache is
[Hkv, D, S] (transposed, so scores vectorize over positions) and its value cache [S, Hkv, Dv];
the ``attention`` op becomes two in-place cache writes (call_tir_inplace) plus an attention
kernel. Weights read by a ``linear`` are stored
packed ([N/PACK, K, PACK]); the manifest records every weight's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import tvm
from tvm import relax, tirx as tir
from tvm.script import tirx as T

from ...ir import Block, Module, Op, Value
from .attention import KEY_BLOCK, attention_te, prefill_attention
from .kernels import BUILDERS, PACK, TVM_DTYPES, DimMap, PackedWeight, Scalar


class CodegenError(NotImplementedError):
    pass


@dataclass
class CacheGeometry:
    layers: int
    kv_heads: int
    head_dim: int
    value_dim: int
    max_seq_len: int
    dtype: str = "f32"

    def shape(self, value: bool = False) -> list[int]:
        """Values are [S, Hkv, Dv]; keys are transposed, [Hkv, D, S], so attention scores
        vectorize over key positions."""
        if value:
            return [self.max_seq_len, self.kv_heads, self.value_dim]
        return [self.kv_heads, self.head_dim, self.max_seq_len]


def cache_geometry(module: Module, max_seq_len: int) -> CacheGeometry:
    attention = [op for op in module.functions["forward"].ops if op.kind == "attention"]
    if not attention:
        raise CodegenError("the model has no attention op; llmc compiles decoder LMs with a KV cache")
    layers = sorted(op.attrs["layer"] for op in attention)
    if layers != list(range(len(layers))):
        raise CodegenError(f"attention layers must be 0..L-1 once each, got {layers}")
    shapes = {(op.operands[1].type.shape[1:], op.operands[2].type.shape[1:], op.operands[0].type.dtype)
              for op in attention}
    if len(shapes) != 1:
        raise CodegenError(f"layers with different KV shapes are not supported yet: {shapes}")
    (kshape, vshape, dtype), = shapes
    max_seq_len = -(-max_seq_len // KEY_BLOCK) * KEY_BLOCK  # attention reads whole blocks of positions
    return CacheGeometry(len(layers), int(kshape[0]), int(kshape[1]), int(vshape[1]), max_seq_len, dtype)


def _param_of(v: Value, outer: dict[int, Value]) -> Optional[str]:
    """The param name a value reads, looking through region arguments to the fused op's operands."""
    v = outer.get(id(v), v)
    if v.producer is not None and v.producer.kind == "param":
        return v.producer.attrs["name"]
    return None


def packed_params(module: Module) -> set[str]:
    """Weights read as the weight of a ``linear`` (they get the packed layout)."""
    out: set[str] = set()

    def visit(block: Block, outer: dict[int, Value]):
        for op in block.ops:
            if op.kind == "linear":
                name = _param_of(op.operands[1], outer)
                n = op.operands[1].type.shape[0]
                if name is not None and isinstance(n, int) and n % PACK == 0:
                    out.add(name)
            if op.region is not None:
                visit(op.region, {id(a): outer.get(id(v), v) for a, v in zip(op.region.args, op.operands)})

    visit(module.functions["forward"].body, {})
    return out


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


CTX_BLOCK = 16  # the step's ctx shape counts cached positions in blocks of this many


def _cache_write(geom: CacheGeometry, keys: bool):
    """In-place write of this step's keys (cache [Hkv, D, S]) or values (cache [S, Hkv, Dv])
    at their positions; positions are clamped so a bad one cannot write out of bounds."""
    S, H = geom.max_seq_len, geom.kv_heads
    dim = geom.head_dim if keys else geom.value_dim
    shape = geom.shape(value=not keys)
    dtype = TVM_DTYPES[geom.dtype]

    @T.prim_func(private=True, check_well_formed=False)
    def kv_write(var_x: T.handle, var_pos: T.handle, var_cache: T.handle):
        T.func_attr({"tirx.noalias": True, "llmc.kind": "kv_write"})
        t = T.int64()
        x = T.match_buffer(var_x, (t, H, dim), dtype)
        pos = T.match_buffer(var_pos, (t,), "int64")
        cache = T.match_buffer(var_cache, shape, dtype)
        if keys:  # a Python constant: the parser keeps only the taken branch
            for h, d, i in T.grid(H, dim, t):  # positions innermost: the transposed cache is written contiguously
                with T.sblock("kv_write"):
                    vh, vd, vi = T.axis.remap("SSS", [h, d, i])
                    cache[vh, vd, T.min(T.max(pos[vi], T.int64(0)), T.int64(S - 1))] = x[vi, vh, vd]
        else:
            for i, h, d in T.grid(t, H, dim):
                with T.sblock("kv_write"):
                    vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                    cache[T.min(T.max(pos[vi], T.int64(0)), T.int64(S - 1)), vh, vd] = x[vi, vh, vd]

    return kv_write


@dataclass
class _FunctionLowering:
    bb: relax.BlockBuilder
    module: Module
    dims: DimMap
    packed: set[str]
    weights: dict[str, relax.Var]
    caches: list[relax.Var]
    geom: CacheGeometry
    n_ctx: Any
    env: dict[int, Any] = field(default_factory=dict)

    def operand(self, v: Value):
        return self.env[id(v)]

    def wrap(self, value, te_tensor):
        """A TE placeholder for a relax value, as the kernel builders expect it."""
        if isinstance(value, _Packed):
            return PackedWeight(te_tensor, value.n, value.k)
        return te_tensor

    def emit_kernel(self, name: str, build, operands: list[Any]):
        """emit_te over the tensor operands; scalars and packed flags travel by closure."""
        tensor_positions = [i for i, o in enumerate(operands) if not isinstance(o, Scalar)]
        relax_args = [operands[i].expr if isinstance(operands[i], _Packed) else operands[i]
                      for i in tensor_positions]

        def te_fn(*te_args):
            full = list(operands)
            for i, te_arg in zip(tensor_positions, te_args):
                full[i] = self.wrap(operands[i], te_arg)
            return build(full)

        return self.bb.emit_te(te_fn, *relax_args, primfunc_name_hint=name)

    def lower_op(self, op: Op):
        kind = op.kind
        if kind == "param":
            name = op.attrs["name"]
            var = self.weights[name]
            if name in self.packed:
                n, k = (int(d) for d in self.module.params[name].type.shape)
                return _Packed(var, n, k)
            return var
        if kind == "constant":
            return Scalar(op.attrs["value"], op.attrs["dtype"])
        operands = [self.operand(v) for v in op.operands]
        if kind == "reshape" and not isinstance(operands[0], (_Packed, Scalar)):
            return self.bb.emit(relax.op.reshape(operands[0], self.dims.shape(op.attrs["shape"])))
        if kind == "attention":
            return self.lower_attention(op, operands)
        if op.region is not None:
            return self.lower_region(op, operands)
        ctx = _KernelCtx(kind, self.dims)
        out_type = op.result.type
        return self.emit_kernel(kind, lambda full: BUILDERS[kind](full, op.attrs, out_type, ctx), operands)

    def lower_region(self, op: Op, operands):
        region = op.region

        def build(full):
            env = {id(a): v for a, v in zip(region.args, full)}
            for inner in region.ops:
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

        out = self.emit_kernel(op.attrs["name"].rsplit("_", 1)[0], build, operands)
        if len(op.results) == 1:
            return out
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(op.results))]

    def lower_attention(self, op: Op, operands):
        q, k, v, pos = operands
        layer = op.attrs["layer"]
        kc, vc = self.caches[2 * layer], self.caches[2 * layer + 1]
        dtype = TVM_DTYPES[self.geom.dtype]
        kw = self.bb.add_func(_cache_write(self.geom, keys=True), "kv_write_k")
        vw = self.bb.add_func(_cache_write(self.geom, keys=False), "kv_write_v")
        kc = self.bb.emit(relax.call_tir_inplace(kw, [k, pos, kc], [2], relax.TensorType(self.geom.shape(), dtype)))
        vc = self.bb.emit(relax.call_tir_inplace(vw, [v, pos, vc], [2], relax.TensorType(self.geom.shape(True), dtype)))
        self.caches[2 * layer], self.caches[2 * layer + 1] = kc, vc
        attrs = dict(op.attrs)
        if isinstance(self.dims.symbols["T"], int) or dtype != "float32":  # decode (or a non-f32 cache): TE stages
            return self.bb.emit_te(lambda qq, kk, vv, pp, m: attention_te(qq, kk, vv, pp, m * CTX_BLOCK, attrs),
                                   q, kc, vc, pos, self.n_ctx, primfunc_name_hint="attention")
        g = self.geom
        kernel = prefill_attention(op.operands[0].type.shape[1], g.kv_heads, g.head_dim, g.value_dim, g.max_seq_len,
                                   attrs["scale"], attrs["window"], attrs["softcap"])
        out_type = relax.TensorType(self.dims.shape(op.result.type.shape), dtype)
        return self.bb.emit(relax.call_tir(self.bb.add_func(kernel, "attention_prefill"), [q, kc, vc, pos], out_type))


@dataclass
class _Packed:
    expr: relax.Var
    n: int
    k: int


def lower_function(bb: relax.BlockBuilder, module: Module, name: str, geom: CacheGeometry,
                   packed: set[str], order: list[str], tokens, rows) -> None:
    """Add Relax function ``name`` to ``bb``: the IR's @forward with T = tokens and B = rows
    (ints for a static entry point, or TIR vars for a dynamic one)."""
    fn = module.functions["forward"]
    n_ctx = tir.Var("ctx_blocks", "int64")  # cached positions attention reads, in CTX_BLOCKs
    dims = DimMap({"T": tokens, "B": rows})
    args = {a.name: relax.Var(a.name, _relax_type(a.type, dims)) for a in fn.args}
    missing = {"input_ids", "positions", "logits_index"} - set(args)
    if missing:
        raise CodegenError(f"@forward lacks {sorted(missing)}; run the select-logits pass before codegen")
    ctx = relax.Var("ctx", relax.ShapeType([n_ctx]))
    dtype = TVM_DTYPES[geom.dtype]
    caches = []
    for layer in range(geom.layers):
        caches.append(relax.Var(f"k_cache_{layer}", relax.TensorType(geom.shape(), dtype)))
        caches.append(relax.Var(f"v_cache_{layer}", relax.TensorType(geom.shape(True), dtype)))
    weights = {}
    for wname in order:
        t = module.params[wname].type
        shape = [int(d) for d in t.shape]
        if wname in packed:
            shape = [shape[0] // PACK, shape[1], PACK]
        weights[wname] = relax.Var("w_" + wname.replace(".", "_"), relax.TensorType(shape, TVM_DTYPES[t.dtype]))
    params = [args["input_ids"], args["positions"], args["logits_index"], ctx] + caches + list(weights.values())
    with bb.function(name, params, attrs={"global_symbol": name}):
        with bb.dataflow():
            low = _FunctionLowering(bb, module, dims, packed, weights, list(caches), geom, n_ctx)
            for a in fn.args:
                low.env[id(a)] = args[a.name]
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


def lower_to_relax(module: Module, max_seq_len: int) -> tuple[tvm.IRModule, dict]:
    """The Relax module with ``prefill`` (dynamic T, B) and ``decode`` (T = B = 1) entry points,
    and the layout facts the artifact records."""
    geom = cache_geometry(module, max_seq_len)
    packed = packed_params(module)
    order = weight_order(module)
    bb = relax.BlockBuilder()
    lower_function(bb, module, "prefill", geom, packed, order, tir.Var("T", "int64"), tir.Var("B", "int64"))
    lower_function(bb, module, "decode", geom, packed, order, 1, 1)
    layout = {"cache": geom, "packed": sorted(packed), "weight_order": order, "pack": PACK}
    return bb.get(), layout
