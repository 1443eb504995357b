"""Lower an optimized, paged llmc IR module to a launch plan of Triton kernels.

The plan is data, not code: named buffers (step inputs, KV pools, weights, temporaries and
aliases) with shapes as expressions in the step's dims (T tokens, B sequences, MB block-table
width, NB pool blocks), and an ordered list of launches, each naming a kernel, its grid (three
expressions), its arguments (buffers and scalar expressions) and an optional ``when``
condition (decode-only batches, few-row linears). Any runner that can allocate buffers and
launch a kernel by name executes it: the Triton runner (JIT, or TRITON_INTERPRET=1 on a CPU)
and the CUDA driver executor with the ahead-of-time binaries.

Every value is a contiguous buffer, so ``reshape`` (and a ``permute`` that only moves size-1
dims) is an alias, never a copy. Floating-point values that depend on the tokens are stored in
the activation dtype (bf16 by default); values computed from positions alone (the RoPE angle
tables) stay fp32, as transformers computes them, and the logits are fp32. Kernels compute in
fp32 and round on store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...ir import Module, Op, Value
from ...ir.types import dim_str
from .blocks import BlockSizes, blocks_for
from .emit import ELEMENTWISE, FLOAT, ROW_OPS, CodegenError, Emitter, dim_src, is_one, unravel_lines
from .kernels import POINTER_TYPES, Kernel, render

STEP_ARGS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start", "logits_index")
DTYPES = ("bf16", "f16", "f32")
SCALARS = [("T", "i32"), ("B", "i32")]


@dataclass
class PlanOptions:
    arch: str = "interpret"   # block-size table entry (blocks.py)
    dtype: str = "bf16"       # activations, weights and KV pools


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _prod_str(dims) -> str:
    parts = [dim_str(d) if isinstance(d, int) else f"({dim_str(d)})" for d in dims if not is_one(d)]
    return "*".join(parts) if parts else "1"


def _prod_src(dims) -> str:
    parts = [dim_src(d) for d in dims if not is_one(d)]
    return " * ".join(parts) if parts else "1"


def _strides(shape) -> list[str]:
    out, acc = [], []
    for d in reversed(shape):
        out.append("*".join(acc) if acc else "1")
        if not is_one(d):
            acc.append(dim_str(d) if isinstance(d, int) else f"({dim_str(d)})")
    return list(reversed(out))


def _cdiv(a: str, b: int) -> str:
    return f"cdiv({a}, {b})"


@dataclass
class Plan:
    buffers: dict[str, dict] = field(default_factory=dict)
    launches: list[dict] = field(default_factory=list)
    derived: dict[str, dict] = field(default_factory=dict)
    kernels: dict[str, Kernel] = field(default_factory=dict)
    outputs: dict[str, object] = field(default_factory=dict)
    dtype: str = "bf16"
    arch: str = "interpret"

    def write_sources(self, directory: str) -> list[str]:
        """Write each kernel's source to ``directory/<name>.py`` (what runners import)."""
        import os

        os.makedirs(directory, exist_ok=True)
        for k in self.kernels.values():
            with open(os.path.join(directory, f"{k.name}.py"), "w") as f:
                f.write(k.source)
        return sorted(self.kernels)

    def to_json(self) -> dict:
        """The plan as the manifest stores it (kernel sources live in their own files)."""
        return {"dtype": self.dtype, "arch": self.arch, "buffers": self.buffers, "launches": self.launches,
                "derived": self.derived, "outputs": self.outputs, "step_args": list(STEP_ARGS)}


class _Lowering:
    def __init__(self, module: Module, options: PlanOptions, step: bool = True):
        self.step = step
        if options.dtype not in DTYPES:
            raise CodegenError(f"--dtype {options.dtype} is not supported; use one of {', '.join(DTYPES)}")
        self.module = module
        self.fn = module.functions["forward"]
        self.opts = options
        self.blocks: BlockSizes = blocks_for(options.arch)
        self.plan = Plan(dtype=options.dtype, arch=options.arch)
        self.env: dict[int, object] = {}
        self._temp = 0
        self._dependent: set[int] = set()
        self._logits_value: Optional[Value] = None
        # Triton's interpreter multiplies bf16 tl.dot operands as raw integers (triton 3.9): on the
        # interpreter, bf16 tiles are widened to fp32 first, which is exact (same products, fp32
        # accumulation as on tensor cores); GPU kernels keep bf16 operands
        self.dot_cast = ".to(tl.float32)" if options.arch == "interpret" and options.dtype == "bf16" else ""

    # ------------------------------------------------------------------ dtypes
    def _analyse(self) -> None:
        """Which values depend on the tokens (stored in the activation dtype) and which op
        writes the logits (stored fp32)."""
        names = {a.name for a in self.fn.args}
        for a in self.fn.args:
            if a.name == "input_ids" or a.name.startswith(("k_pool_", "v_pool_")) or not self.step:
                self._dependent.add(id(a))
        self._weight_act: set[str] = set()
        for op in self.fn.ops:
            if any(id(v) in self._dependent for v in op.operands):
                for r in op.results:
                    self._dependent.add(id(r))
                for v in op.operands:
                    if v.producer is not None and v.producer.kind == "param":
                        self._weight_act.add(v.producer.attrs["name"])
        v = self.fn.results[0]
        while v.producer is not None and v.producer.kind == "reshape":
            v = v.producer.operands[0]
        self._logits_value = v
        missing = set(STEP_ARGS) - names
        if missing and self.step:
            raise CodegenError(f"@forward lacks {sorted(missing)}; run select-logits and paged-kv before codegen")

    def dtype_of(self, v: Value) -> str:
        if v.type.dtype not in FLOAT:
            return v.type.dtype
        if v is self._logits_value:
            return "f32"
        return self.opts.dtype if id(v) in self._dependent else "f32"

    # ------------------------------------------------------------------ buffers
    def add_buffer(self, name: str, shape, dtype: str, kind: str, alias: Optional[str] = None) -> str:
        self.plan.buffers[name] = {"shape": [dim_str(d) for d in shape], "dtype": dtype, "kind": kind,
                                   **({"alias": alias} if alias else {})}
        return name

    def temp(self, v: Value, dtype: Optional[str] = None) -> str:
        self._temp += 1
        name = f"t{self._temp}_{v.name}"
        return self.add_buffer(name, v.type.shape, dtype or self.dtype_of(v), "temp")

    def alias(self, v: Value, base: str) -> str:
        root = self.plan.buffers[base].get("alias", base)
        self._temp += 1
        return self.add_buffer(f"a{self._temp}_{v.name}", v.type.shape, self.plan.buffers[root]["dtype"], "alias", root)

    def buf(self, v: Value) -> str:
        b = self.env[id(v)]
        if not isinstance(b, str):
            raise CodegenError(f"%{v.name} is a constant where a tensor is needed")
        return b

    def ptr_type(self, buffer: str) -> str:
        return POINTER_TYPES[self.plan.buffers[buffer]["dtype"]]

    def kernel(self, k: Kernel) -> str:
        self.plan.kernels.setdefault(k.name, k)
        return k.name

    def launch(self, kernel: Kernel, grid, args, when: Optional[str] = None, op: str = "") -> None:
        name = self.kernel(kernel)
        entry = {"kernel": name, "grid": [str(g) for g in grid] + ["1"] * (3 - len(grid)), "args": args, "op": op}
        if when:
            entry["when"] = when
        self.plan.launches.append(entry)

    # ------------------------------------------------------------------ driver
    def run(self) -> Plan:
        self._analyse()
        for a in self.fn.args:
            if not self.step:
                self.env[id(a)] = self.add_buffer(a.name, a.type.shape, self.dtype_of(a), "input")
            elif a.name in STEP_ARGS:
                self.env[id(a)] = self.add_buffer(a.name, a.type.shape, a.type.dtype, "input")
            elif a.name.startswith(("k_pool_", "v_pool_")):
                self.env[id(a)] = self.add_buffer(a.name, a.type.shape, self.opts.dtype, "pool")
            else:
                raise CodegenError(f"@forward takes argument {a.name} that the runtime does not provide")
        for op in self.fn.ops:
            self.lower(op)
        if not self.step:
            self.plan.outputs = {"results": [self.buf(v) for v in self.fn.results]}
            return self.plan
        logits = self.buf(self.fn.results[0])
        pools = [self.buf(v) for v in self.fn.results[1:]]
        pool_args = [a.name for a in self.fn.args if a.name.startswith(("k_pool_", "v_pool_"))]
        if [self.plan.buffers[p].get("alias", p) for p in pools] != pool_args:
            raise CodegenError("@forward must return the logits followed by the updated KV pools "
                               "(the paged-kv pass's form)")
        self.plan.outputs = {"logits": logits, "pools": pool_args}
        return self.plan

    def lower(self, op: Op) -> None:
        kind = op.kind
        if kind == "param":
            name = op.attrs["name"]
            if name not in self.plan.buffers:
                t = self.module.params[name].type
                dtype = (self.opts.dtype if name in self._weight_act else "f32") if t.dtype in FLOAT else t.dtype
                self.add_buffer(name, t.shape, dtype, "weight")
            self.env[id(op.result)] = name
        elif kind == "constant":
            self.env[id(op.result)] = ("const", float(op.attrs["value"]))
        elif kind == "reshape":
            self.env[id(op.result)] = self.alias(op.result, self.buf(op.operands[0]))
        elif kind == "permute":
            self.lower_permute(op)
        elif kind in ("slice", "expand", "concat"):
            self.lower_copy(op)
        elif kind == "embedding":
            self.lower_embedding(op)
        elif kind == "kv_append":
            self.lower_kv_append(op)
        elif kind == "paged_attention":
            self.lower_attention(op)
        elif kind == "linear":
            self.lower_linear(op, [op], op.operands, op.operands, [op.result], [op.result], "linear")
        elif kind == "fused":
            region = op.region
            inner = region.ops
            label = op.attrs["name"].rsplit("_", 1)[0]
            if inner and inner[0].kind == "linear":
                self.lower_linear(op, inner, op.operands, region.args, region.results, op.results, label)
            elif any(o.kind in ROW_OPS for o in inner):
                self.lower_row(inner, op.operands, region.args, region.results, op.results, label)
            else:
                self.lower_elementwise(op.operands, region.args, region.results, op.results, label)
        elif kind == "rope" and self._rope_fits(op):
            self.lower_rope(op)
        elif kind in ROW_OPS:
            self.lower_row([op], op.operands, op.operands, [op.result], [op.result], kind)
        elif kind in ELEMENTWISE:
            self.lower_elementwise(op.operands, op.operands, [op.result], [op.result], kind)
        else:
            raise CodegenError(f"op '{kind}' (%{op.results[0].name}) has no Triton kernel; supported: linear, "
                               f"fused regions, embedding, kv_append, paged_attention, shape ops and "
                               f"{', '.join(sorted(ELEMENTWISE | ROW_OPS))}")

    # ------------------------------------------------------------------ region kernels
    def _bind_args(self, em: Emitter, outer, inner, skip=()) -> list[tuple[str, str]]:
        params, args = [], []
        seen: dict[str, str] = {}
        for i, (o, a) in enumerate(zip(outer, inner)):
            if any(a is s for s in skip):
                continue
            b = self.env[id(o)]
            if isinstance(b, tuple):
                em.bind_const(a, b[1])
                continue
            if b in seen:
                em.bind_pointer(a, seen[b])
                continue
            name = seen[b] = f"a{i}"
            em.bind_pointer(a, name)
            params.append((name, self.ptr_type(b)))
            args.append(["buf", b])
        return params, args

    def _outputs(self, results_outer) -> tuple[list[tuple[str, str]], list, list[str]]:
        params, args, names = [], [], []
        for j, r in enumerate(results_outer):
            b = self.temp(r)
            self.env[id(r)] = b
            params.append((f"o{j}", self.ptr_type(b)))
            args.append(["buf", b])
            names.append(f"o{j}")
        return params, args, names

    def lower_elementwise(self, outer, inner, results, results_outer, label: str) -> None:
        shape = list(results[0].type.shape)
        last = shape[-1]
        lead_lines, lead = unravel_lines("l", "row", shape[:-1])
        em = Emitter(shape, lead, "col", "mask", row_mode=False)
        params, args = self._bind_args(em, outer, inner)
        values = [em.get(r) for r in results]
        oparams, oargs, onames = self._outputs(results_outer)
        block = self.blocks.elementwise
        k = render("elementwise.py.j2", label, params + oparams + SCALARS, what=label, block=block,
                   out_shape=[dim_str(d) for d in shape], numel=_prod_src(shape), last=dim_src(last),
                   lead_lines=lead_lines, body=em.lines, stores=list(zip(onames, values)))
        self.launch(k, [_cdiv(_prod_str(shape), block)], args + oargs + self._scalar_args(), op=label)

    def lower_row(self, ops, outer, inner, results, results_outer, label: str) -> None:
        shape = list(results[0].type.shape)
        last = shape[-1]
        if not isinstance(last, int):
            raise CodegenError(f"{label}: a row kernel needs a static last dim, got {last}")
        lead_lines, lead = unravel_lines("l", "row", shape[:-1])
        em = Emitter(shape, lead, "col", "mask", row_mode=True)
        params, args = self._bind_args(em, outer, inner)
        values = [em.get(r) for r in results]
        oparams, oargs, onames = self._outputs(results_outer)
        k = render("rms_norm.py.j2", label, params + oparams + SCALARS, num_warps=4 if last <= 2048 else 8,
                   what=label, block=_pow2(last), out_shape=[dim_str(d) for d in shape], last=last,
                   lead_lines=lead_lines, body=em.lines, stores=list(zip(onames, values)))
        self.launch(k, [_prod_str(shape[:-1])], args + oargs + self._scalar_args(), op=label)

    def _rope_fits(self, op: Op) -> bool:
        x, cos, sin = (list(v.type.shape) for v in op.operands)
        return (len(x) >= 2 and cos == sin and len(cos) == len(x) and is_one(cos[-2])
                and all(a == b for a, b in zip(cos[:-2], x[:-2])) and cos[-1] == x[-1] and isinstance(x[-1], int)
                and isinstance(x[-2], int) and all(isinstance(self.env[id(v)], str) for v in op.operands))

    def lower_rope(self, op: Op) -> None:
        x, cos, sin = op.operands
        shape = list(x.type.shape)
        d, heads = shape[-1], shape[-2]
        out = self.temp(op.result)
        self.env[id(op.result)] = out
        params = [("x_ptr", self.ptr_type(self.buf(x))), ("cos_ptr", self.ptr_type(self.buf(cos))),
                  ("sin_ptr", self.ptr_type(self.buf(sin))), ("out_ptr", self.ptr_type(out))] + SCALARS
        k = render("rope.py.j2", "rope", params, num_warps=1 if d <= 128 else 2, dim=d, heads=heads,
                   rows=_prod_str(shape[:-1]), block=_pow2(d))
        self.launch(k, [_prod_str(shape[:-1])],
                    [["buf", self.buf(x)], ["buf", self.buf(cos)], ["buf", self.buf(sin)], ["buf", out]]
                    + self._scalar_args(), op="rope")

    def _scalar_args(self) -> list:
        return [["int", "T"], ["int", "B"]]

    def lower_linear(self, op: Op, ops, outer, inner, results, results_outer, label: str) -> None:
        lin = ops[0]
        x, w = lin.operands[0], lin.operands[1]
        bias = lin.operands[2] if len(lin.operands) == 3 else None
        pos = {id(a): i for i, a in enumerate(inner)}
        for v, what in ((x, "input"), (w, "weight")) + (((bias, "bias"),) if bias is not None else ()):
            if id(v) not in pos:
                raise CodegenError(f"{label}: the linear's {what} must be a kernel operand")
        xb, wb = self.buf(outer[pos[id(x)]]), self.buf(outer[pos[id(w)]])
        n, kdim = (int(d) if isinstance(d, int) else None for d in w.type.shape)
        if n is None or kdim is None:
            raise CodegenError(f"{label}: linear weights need static shapes, got {w.type}")
        shape = list(results[0].type.shape)
        if shape[-1] != n:
            raise CodegenError(f"{label}: the epilogue changes the output width ({shape[-1]} vs {n})")
        base = [("x_ptr", self.ptr_type(xb)), ("w_ptr", self.ptr_type(wb))]
        base_args = [["buf", xb], ["buf", wb]]
        if bias is not None:
            bb = self.buf(outer[pos[id(bias)]])
            base.append(("bias_ptr", self.ptr_type(bb)))
            base_args.append(["buf", bb])
        epilogue = ", ".join(o.kind for o in ops[1:])
        m_str, m_src = _prod_str(shape[:-1]), _prod_src(shape[:-1])
        bl = self.blocks
        precision = "ieee" if self.opts.dtype == "f32" else None
        outs = None
        variants = [("gemv", f"{m_str} <= {bl.gemv_max_rows}"),
                    ("gemm_skinny", f"{m_str} > {bl.gemv_max_rows} and {m_str} <= {bl.skinny_max_rows}"),
                    ("gemm", f"{m_str} > {bl.skinny_max_rows}")]
        for variant, when in variants:
            if variant == "gemv":
                lead_lines, lead = unravel_lines("l", "m", shape[:-1])
            else:
                lead_lines, lead = unravel_lines("l", "m2", shape[:-1])
            em = Emitter(shape, lead, "col", "mask", row_mode=False)
            em.bind_expr(lin.result, "acc")
            params, args = self._bind_args(em, outer, inner, skip=[v for v in (x, w, bias) if v is not None])
            values = [em.get(r) for r in results]
            if outs is None:
                outs = self._outputs(results_outer)
            oparams, oargs, onames = outs
            allp = base + params + oparams + SCALARS
            alla = base_args + args + oargs + self._scalar_args()
            ctx = dict(what=f"{label}: {variant}", n=n, k=kdim, bias=bias is not None, epilogue=epilogue,
                       lead_lines=lead_lines, body=em.lines, stores=list(zip(onames, values)))
            if variant == "gemv":
                bn, bk, warps = bl.gemv
                k = render("gemv.py.j2", f"{label}_gemv", allp, num_warps=warps, num_stages=2, bn=bn, bk=bk, **ctx)
                grid = [_cdiv(str(n), bn), m_str]
            else:
                bm, bn, bk, warps, stages = bl.gemm_skinny if variant == "gemm_skinny" else bl.gemm
                tiles_n = -(-n // bn)
                k = render("gemm.py.j2", f"{label}_{variant}", allp, num_warps=warps, num_stages=stages, bm=bm,
                           bn=bn, bk=bk, m=m_src, precision=precision, dot_cast=self.dot_cast, group_m=8,
                           tiles_n=tiles_n, **ctx)
                grid = [f"{_cdiv(m_str, bm)}*{tiles_n}"]
            self.launch(k, grid, alla, when=when, op=label)

    # ------------------------------------------------------------------ data movement
    def _copy(self, src: str, dst: str, iter_shape, src_strides, src_off, dst_strides, dst_off, label: str):
        dims = [(s, a, b) for s, a, b in zip(iter_shape, src_strides, dst_strides) if not is_one(s)]
        if len(dims) > 4:
            raise CodegenError(f"{label}: copies of rank > 4 are not supported")
        dims = [(1, "0", "0")] * (4 - len(dims)) + dims
        dtype = self.plan.buffers[src].get("dtype")
        params = [("src_ptr", self.ptr_type(src)), ("dst_ptr", self.ptr_type(dst))] + \
                 [(p, "i32") for p in ("n", "s0", "s1", "s2", "s3", "a0", "a1", "a2", "a3", "src_off",
                                       "b0", "b1", "b2", "b3", "dst_off")]
        block = self.blocks.elementwise
        k = render("copy.py.j2", "copy", params, what=f"strided copy ({dtype})", block=block)
        n = _prod_str(iter_shape)
        ints = [n] + [dim_str(s) if isinstance(s, int) else f"({dim_str(s)})" for s, _, _ in dims] + \
               [a for _, a, _ in dims] + [src_off] + [b for _, _, b in dims] + [dst_off]
        self.launch(k, [_cdiv(n, block)], [["buf", src], ["buf", dst]] + [["int", str(e)] for e in ints], op=label)

    def lower_permute(self, op: Op) -> None:
        x = op.operands[0]
        perm = op.attrs["perm"]
        src_shape = list(x.type.shape)
        moved = [p for p in perm if not is_one(src_shape[p])]
        if moved == sorted(moved):
            self.env[id(op.result)] = self.alias(op.result, self.buf(x))
            return
        out = self.temp(op.result)
        self.env[id(op.result)] = out
        st = _strides(src_shape)
        out_shape = list(op.result.type.shape)
        self._copy(self.buf(x), out, out_shape, [st[p] for p in perm], "0", _strides(out_shape), "0", "permute")

    def lower_copy(self, op: Op) -> None:
        out = self.temp(op.result)
        self.env[id(op.result)] = out
        out_shape = list(op.result.type.shape)
        ost = _strides(out_shape)
        if op.kind == "slice":
            x = op.operands[0]
            st = _strides(list(x.type.shape))
            axis, step = op.attrs["axis"] % len(out_shape), op.attrs["step"]
            src = list(st)
            src[axis] = f"({st[axis]})*{step}"
            start = op.attrs["start"]
            start_s = str(start) if isinstance(start, int) else f"({dim_str(start)})"
            self._copy(self.buf(x), out, out_shape, src, f"{start_s}*({st[axis]})", ost, "0", "slice")
        elif op.kind == "expand":
            x = op.operands[0]
            xs = list(x.type.shape)
            st = _strides(xs)
            off = len(out_shape) - len(xs)
            src = ["0"] * off + [("0" if is_one(xs[i]) and not is_one(out_shape[off + i]) else st[i])
                                 for i in range(len(xs))]
            self._copy(self.buf(x), out, out_shape, src, "0", ost, "0", "expand")
        else:  # concat
            axis = op.attrs["axis"] % len(out_shape)
            offset = "0"
            for x in op.operands:
                xs = list(x.type.shape)
                self._copy(self.buf(x), out, xs, _strides(xs), "0", ost, f"({offset})*({ost[axis]})", "concat")
                d = xs[axis]
                offset = f"{offset}+{dim_str(d) if isinstance(d, int) else '(' + dim_str(d) + ')'}"

    def lower_embedding(self, op: Op) -> None:
        table, ids = op.operands
        rows, dim = table.type.shape
        if not isinstance(dim, int):
            raise CodegenError(f"embedding needs a static width, got {table.type}")
        tb, ib = self.buf(table), self.buf(ids)
        out = self.temp(op.result)
        self.env[id(op.result)] = out
        params = [("table_ptr", self.ptr_type(tb)), ("ids_ptr", self.ptr_type(ib)), ("out_ptr", self.ptr_type(out))]
        k = render("embedding.py.j2", "embedding", params + SCALARS, num_warps=4, rows=dim_src(rows), dim=dim,
                   block=min(_pow2(dim), 1024))
        self.launch(k, [_prod_str(ids.type.shape)], [["buf", tb], ["buf", ib], ["buf", out]] + self._scalar_args(),
                    op="embedding")

    def lower_kv_append(self, op: Op) -> None:
        k_pool, v_pool, k, v, slots = op.operands
        _, bs, heads, dim = k_pool.type.shape
        vdim = v_pool.type.shape[3]
        kp, vp = self.buf(k_pool), self.buf(v_pool)
        bufs = [self.buf(k), self.buf(v), self.buf(slots), kp, vp]
        names = ["k_ptr", "v_ptr", "slots_ptr", "k_pool_ptr", "v_pool_ptr"]
        kern = render("kv_append.py.j2", "kv_append", [(n, self.ptr_type(b)) for n, b in zip(names, bufs)] + SCALARS,
                      num_warps=1, heads=heads, dim=dim, vdim=vdim, block_size=bs, kblock=_pow2(heads * dim),
                      vblock=_pow2(heads * vdim))
        self.launch(kern, ["T"], [["buf", b] for b in bufs] + self._scalar_args(), op="kv_append")
        self.env[id(op.results[0])] = self.alias(op.results[0], kp)
        self.env[id(op.results[1])] = self.alias(op.results[1], vp)

    def lower_attention(self, op: Op) -> None:
        if len(op.operands) > 6:
            raise CodegenError("the Triton attention kernels take no attention sinks (paged_attention's seventh "
                               "operand); compile this model for cpu")
        q, k_pool, v_pool, tables, seq_lens, qstart = op.operands
        _, hq, d = q.type.shape
        _, bs, hkv, _ = k_pool.type.shape
        dv = v_pool.type.shape[3]
        if bs < 16 or bs & (bs - 1):
            raise CodegenError(f"the Triton attention kernels need a KV block size that is a power of two >= 16, "
                               f"got {bs}; compile with --kv-block-size 16 (the GPU default)")
        if op.attrs.get("alibi"):
            raise CodegenError("the Triton attention kernels have no ALiBi position biases (paged_attention alibi, "
                               "Bloom/MPT-style models); compile this model for cpu")
        if op.attrs.get("chunk", 0):
            raise CodegenError(f"the Triton attention kernels have no chunked attention (paged_attention chunk="
                               f"{op.attrs['chunk']}, Llama 4's local layers); compile this model for cpu")
        group = hq // hkv
        gp = _pow2(group)
        a = op.attrs
        out = self.temp(op.result)
        self.env[id(op.result)] = out
        ins = [self.buf(v) for v in (q, k_pool, v_pool, tables, seq_lens, qstart)]
        in_params = [(n, self.ptr_type(b)) for n, b in zip(
            ("q_ptr", "k_pool_ptr", "v_pool_ptr", "tables_ptr", "seq_lens_ptr", "query_start_ptr"), ins)]
        kt = max(bs, self.blocks.attn_keys)
        common = dict(group=group, gp=gp, hq=hq, hkv=hkv, d=d, dp=_pow2(d), dv_=dv, dvp=_pow2(dv), bs=bs, kt=kt,
                      scale=repr(float(a["scale"])), window=int(a["window"]), softcap=float(a["softcap"]) or 0)
        # prefill / mixed batches
        bm = max(self.blocks.attn_rows, _pow2(-(-16 // gp)))
        tiles = f"tiles_{bm}"
        self.plan.derived.setdefault(tiles, {"kind": "query_tiles", "rows": bm, "count": f"NT_{bm}"})
        precision = "ieee" if self.opts.dtype == "f32" else None
        kp = render("attention_prefill.py.j2", "attention_prefill",
                    in_params + [("tiles_ptr", "*i32"), ("out_ptr", self.ptr_type(out)), ("T", "i32"), ("B", "i32"),
                                 ("MB", "i32")],
                    num_warps=self.blocks.attn_warps, num_stages=2, bm=bm, precision=precision,
                    dot_cast=self.dot_cast, **common)
        self.launch(kp, [f"NT_{bm}", str(hkv)],
                    [["buf", b] for b in ins] + [["buf", tiles], ["buf", out], ["int", "T"], ["int", "B"],
                                                 ["int", "MB"]], when="not decode", op="paged_attention")
        # decode batches: split-KV partials, then their reduction
        splits = self.blocks.decode_splits
        self._temp += 1
        pm = self.add_buffer(f"t{self._temp}_part_m", ["B", hq, splits], "f32", "temp")
        pl = self.add_buffer(f"t{self._temp}_part_l", ["B", hq, splits], "f32", "temp")
        po = self.add_buffer(f"t{self._temp}_part_o", ["B", hq, splits, dv], "f32", "temp")
        kd = render("attention_decode.py.j2", "attention_decode",
                    in_params + [("part_m_ptr", "*fp32"), ("part_l_ptr", "*fp32"), ("part_o_ptr", "*fp32"),
                                 ("T", "i32"), ("B", "i32"), ("MB", "i32")],
                    num_warps=4, num_stages=2, splits=splits, **common)
        self.launch(kd, ["B", str(hkv), str(splits)],
                    [["buf", b] for b in ins] + [["buf", pm], ["buf", pl], ["buf", po], ["int", "T"], ["int", "B"],
                                                 ["int", "MB"]], when="decode", op="paged_attention")
        kr = render("attention_reduce.py.j2", "attention_reduce",
                    [("part_m_ptr", "*fp32"), ("part_l_ptr", "*fp32"), ("part_o_ptr", "*fp32"),
                     ("query_start_ptr", self.ptr_type(ins[5])), ("out_ptr", self.ptr_type(out)), ("T", "i32"),
                     ("B", "i32")],
                    num_warps=1, splits=splits, hq=hq, dv_=dv, dvp=_pow2(dv))
        self.launch(kr, ["B", str(hq)], [["buf", pm], ["buf", pl], ["buf", po], ["buf", ins[5]], ["buf", out],
                                         ["int", "T"], ["int", "B"]], when="decode", op="paged_attention")


def lower_to_plan(module: Module, options: Optional[PlanOptions] = None, step: bool = True) -> Plan:
    """The launch plan of ``module``'s paged @forward (see the module docstring). With
    ``step=False`` any @forward is lowered (its arguments become inputs, its results the
    outputs): how the kernel tests run one op or region at a time."""
    return _Lowering(module, options or PlanOptions(), step).run()
